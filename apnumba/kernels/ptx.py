"""PTX instructions the kernels need, one small named function each.

On the GPU every function below is a numba intrinsic that emits one inline-PTX
instruction (through ``llvmlite.ir.InlineAsm``).  Under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, read at import time) the same names are bound to
Python fallbacks in :mod:`apnumba.kernels.simwarp` that compute the identical
per-lane result, so a kernel runs unchanged in both worlds.

Binary tensor-core products (PTX ISA, "mma" with ``.b1``)::

    mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc
        D[16 x 8] = popc(A[16 x 256 bits] AND B[256 bits x 8]) + C

Fragments (``g = lane >> 2``, ``t = lane & 3``; a word is 32 consecutive bits
of K, the same bit order in A and B)::

    m16n8k256  a0 = A[g] word t     a1 = A[g+8] word t
               a2 = A[g] word 4+t   a3 = A[g+8] word 4+t
               b0 = B[:, g] word t  b1 = B[:, g] word 4+t
               d0, d1 = D[g][2t], D[g][2t+1]    d2, d3 = D[g+8][2t], D[g+8][2t+1]
    m8n8k128   a = A[g] word t      b = B[:, g] word t
               d0, d1 = D[g][2t], D[g][2t+1]

int8 tensor-core products, for operands stored as bytes (``reference``: byte packing)::

    mma.sync.aligned.m16n8k32.row.col.s32.{s8|u8}.{s8|u8}.s32
        D[16 x 8] = A[16 x 32 int8] B[32 x 8 int8] + C

Its fragments are the m16n8k256 ones word for word (a word is 4 consecutive k), so the
same shared-memory stages and ldmatrix loads feed it: one k-step is 32 bytes either way.

Warpgroup products (sm_90a: numba builds for ``sm_90a`` on an H100), operands from shared memory::

    wgmma.mma_async.sync.aligned.m64n{N}k256.s32.b1.b1.and.popc  {d}, desc_a, desc_b, p;
        D[64 x N] = popc(A[64 x 256 bits] AND B[256 bits x N]) + (p ? D : 0)

issued by the 128 threads of a warpgroup (warp w holds rows 16w .. 16w + 15 of D; per n8 column
group c it holds registers 4c .. 4c + 3 laid out as an m16n8 fragment above).  A and B are
K-major tiles described by 64-bit matrix descriptors (``smem_desc``): rows of 32, 64 or 128 bytes
(one, two or four k-steps) whose 16-byte chunks are XOR-swizzled in atoms of 8 rows - exactly the
layout ``apmm`` stages use for 1, 2 or 4 k-steps a stage.  Checked on the H100 against numpy.

Why AND only: on sm_90 the ``.xor.popc`` form is not native - ptxas expands it
into two AND BMMAs plus NOTs and it runs 6.5x slower (see
``shared/notes/hopper-b1-and-numba.md``).  Every encoding apnumba supports is
expressed with AND (``apnumba.reference`` writes the identities down); the XOR
forms are here only so that tests and ``bench.py`` can show the difference.
"""

import functools

from numba import config as _numba_config

SIMULATOR = bool(_numba_config.ENABLE_CUDASIM)

__all__ = [
    "SIMULATOR",
    "mma_m16n8k256_and",
    "mma_m16n8k256_xor",
    "mma_m8n8k128_and",
    "mma_m8n8k128_xor",
    "mma_m16n8k32_int8",
    "popc32",
    "ldmatrix_x4",
    "ldmatrix_x2",
    "ld_shared",
    "divmod_u32",
    "divmod_magic",
    "magic_divisor",
    "st_shared_v2",
    "st_shared",
    "ld_shared_v4",
    "st_global_v4",
    "st_global_cs_v4",
    "st_global_v2",
    "st_global_cs_v2",
    "ld_global_cg_v4",
    "SHARED_ALIGN",
    "cp_async_16",
    "cp_async_4",
    "cp_async_commit",
    "cp_async_wait",
    "ballot",
    "shfl_idx",
    "f32_div_rn",
    "f32_mul_rn",
    "f32_add_rn",
    "f32_rint",
    "wgmma_b1",
    "wgmma_fence",
    "wgmma_commit",
    "wgmma_wait",
    "fence_proxy_async",
    "fence_acq_rel_gpu",
    "zeros_i32",
    "pin_registers",
    "smem_desc",
    "smem_addr",
    "tuple_into",
    "global_timer_ns",
    "sleep_ns",
    "sm_count",
    "DESC_SWIZZLE",
]

# Matrix-descriptor swizzle code and stride between 8-row atoms (bytes), by the bytes of a K-major row.
DESC_SWIZZLE = {32: (3, 256), 64: (2, 512), 128: (1, 1024)}

# Alignment for shared arrays read by ldmatrix / written by cp.async (16 bytes at
# least); the simulator's shared arrays take no alignment argument.
SHARED_ALIGN = None if SIMULATOR else 128


def magic_divisor(d):
    """(magic, shift) that divide by d, 1 <= d < 2^31, in :func:`divmod_magic`: for 0 <= n < 2^31,
    n // d = umulhi(2n, magic) >> shift with shift = ceil(log2 d), magic = ceil(2^(31 + shift) / d)
    (< 2^32).  Exact: magic * d = 2^(31 + shift) + e with 0 <= e < d <= 2^shift, so n * magic / 2^(31 + shift)
    exceeds n / d by n * e / (d * 2^(31 + shift)) < 1 / d - never enough to reach the next multiple.
    magic is returned as the int32 with its bits (for int32 parameter arrays)."""
    d = int(d)
    if not 1 <= d < 2**31:
        raise ValueError(f"magic_divisor: expected a divisor in [1, 2**31), got {d}")
    shift = (d - 1).bit_length()
    magic = -(-(1 << (31 + shift)) // d)
    return magic - (1 << 32) if magic >= 1 << 31 else magic, shift


if SIMULATOR:
    from .simwarp import (  # noqa: F401
        mma_m16n8k256_and,
        mma_m16n8k256_xor,
        mma_m8n8k128_and,
        mma_m8n8k128_xor,
        mma_m16n8k32_int8,
        popc32,
        ldmatrix_x4,
        ldmatrix_x2,
        ld_shared,
        divmod_u32,
        divmod_magic,
        st_shared_v2,
        st_shared,
        ld_shared_v4,
        st_global_v4,
        st_global_cs_v4,
        st_global_v2,
        st_global_cs_v2,
        ld_global_cg_v4,
        cp_async_16,
        cp_async_4,
        cp_async_commit,
        cp_async_wait,
        ballot,
        shfl_idx,
        f32_div_rn,
        f32_mul_rn,
        f32_add_rn,
        f32_rint,
        wgmma_b1,
        wgmma_fence,
        wgmma_commit,
        wgmma_wait,
        fence_proxy_async,
        fence_acq_rel_gpu,
        zeros_i32,
        pin_registers,
        smem_desc,
        smem_addr,
        tuple_into,
        global_timer_ns,
        sleep_ns,
        sm_count,
    )
else:
    from llvmlite import ir
    from numba import cuda, types, uint32
    from numba.cuda.extending import intrinsic

    _i32 = ir.IntType(32)

    def _as_i32(context, builder, sig, args):
        return [context.cast(builder, v, t, types.int32) for v, t in zip(args, sig.args)]

    def _mma_asm(shape, op, n_d, n_a, n_b):
        """An InlineAsm node for one mma: outputs d, inputs a, b, c (c as many as d).

        op: "and" / "xor" (b1 with popc), or int8 operand types such as "s8.u8"."""
        ops = [f"${i}" for i in range(n_d + n_a + n_b + n_d)]
        d, a = ops[:n_d], ops[n_d : n_d + n_a]
        b, c = ops[n_d + n_a : n_d + n_a + n_b], ops[n_d + n_a + n_b :]
        kind = f"b1.b1.s32.{op}.popc" if op in ("and", "xor") else f"{op}.s32"
        text = (
            f"mma.sync.aligned.{shape}.row.col.s32.{kind} "
            f"{{{','.join(d)}}}, {{{','.join(a)}}}, {{{','.join(b)}}}, {{{','.join(c)}}};"
        )
        constraints = ",".join(["=r"] * n_d + ["r"] * (n_a + n_b + n_d))
        ret = ir.LiteralStructType([_i32] * n_d)
        fnty = ir.FunctionType(ret, [_i32] * (n_a + n_b + n_d))
        return ir.InlineAsm(fnty, text, constraints, side_effect=False), n_d

    def _emit_mma(shape, op, n_d, n_a, n_b):
        asm, n_out = _mma_asm(shape, op, n_d, n_a, n_b)

        def codegen(context, builder, sig, args):
            res = builder.call(asm, _as_i32(context, builder, sig, args))
            vals = [builder.extract_value(res, i) for i in range(n_out)]
            return context.make_tuple(builder, sig.return_type, vals)

        return codegen

    def _make_m16n8k256(op):
        codegen = _emit_mma("m16n8k256", op, 4, 4, 2)

        @intrinsic
        def mma_m16n8k256(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            sig = types.UniTuple(types.int32, 4)(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)
            return sig, codegen

        mma_m16n8k256.__doc__ = (
            f"(d0, d1, d2, d3) = popc(A {op.upper()} B) + C for one m16n8k256 b1 tile (module doc: fragments)."
        )
        return mma_m16n8k256

    def _make_m8n8k128(op):
        codegen = _emit_mma("m8n8k128", op, 2, 1, 1)

        @intrinsic
        def mma_m8n8k128(typingctx, a, b, c0, c1):
            sig = types.UniTuple(types.int32, 2)(a, b, c0, c1)
            return sig, codegen

        mma_m8n8k128.__doc__ = f"(d0, d1) = popc(A {op.upper()} B) + C for one m8n8k128 b1 tile."
        return mma_m8n8k128

    @functools.lru_cache(maxsize=None)
    def mma_m16n8k32_int8(types_ab):
        """The int8 mma for operand types ``types_ab`` ("s8.s8", "s8.u8", "u8.s8" or "u8.u8"):
        (d0, d1, d2, d3) = A B + C for one m16n8k32 tile (module doc: fragments)."""
        if types_ab not in ("s8.s8", "s8.u8", "u8.s8", "u8.u8"):
            raise ValueError(f"types_ab: expected 's8' or 'u8' for each operand, e.g. 's8.u8', got {types_ab!r}")
        codegen = _emit_mma("m16n8k32", types_ab, 4, 4, 2)

        @intrinsic
        def mma_m16n8k32(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            sig = types.UniTuple(types.int32, 4)(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)
            return sig, codegen

        return mma_m16n8k32

    mma_m16n8k256_and = _make_m16n8k256("and")
    mma_m16n8k256_xor = _make_m16n8k256("xor")
    mma_m8n8k128_and = _make_m8n8k128("and")
    mma_m8n8k128_xor = _make_m8n8k128("xor")

    @cuda.jit(device=True, inline="always")
    def popc32(x):
        """Population count of the low 32 bits (``popc.b32``, never ``popc.b64``)."""
        return cuda.popc(uint32(x))

    def _element_pointer(context, builder, arytype, ary, index, index_type):
        """Pointer to ``ary.ravel()[index]`` (the array must be C-contiguous)."""
        array = context.make_array(arytype)(context, builder, value=ary)
        idx = context.cast(builder, index, index_type, types.intp)
        return builder.gep(array.data, [idx])

    def _shared_address(context, builder, arytype, ary, index, index_type):
        """32-bit shared-window address of ``ary.ravel()[index]``, computed in 32 bits.

        (LLVM would do the arithmetic of an addrspace(3) pointer in 64 bits, with a
        sign extension per access; shared addresses fit in 32.)
        """
        array = context.make_array(arytype)(context, builder, value=ary)
        base = builder.ptrtoint(builder.addrspacecast(array.data, array.data.type.pointee.as_pointer(3)), _i32)
        idx = context.cast(builder, index, index_type, types.int32)
        size = ir.Constant(_i32, context.get_abi_sizeof(context.get_data_type(arytype.dtype)))
        return builder.add(base, builder.mul(idx, size))

    def _check_word_array(name, smem):
        if not (isinstance(smem, types.Array) and smem.dtype.bitwidth == 32):
            raise TypeError(f"{name}: expected an array of 32-bit words, got {smem}")

    @intrinsic
    def divmod_u32(typingctx, a, b):
        """(a // b, a % b) for non-negative values below 2^32, in 32-bit arithmetic.

        numba widens integer arithmetic to 64 bits, and a 64-bit division by a run-time
        value is a call into a slow helper routine; this stays one 32-bit division."""

        def codegen(context, builder, sig, args):
            x = context.cast(builder, args[0], sig.args[0], types.uint32)
            y = context.cast(builder, args[1], sig.args[1], types.uint32)
            q = builder.udiv(x, y)
            r = builder.sub(x, builder.mul(q, y))
            return context.make_tuple(builder, sig.return_type, [q, r])

        return types.UniTuple(types.uint32, 2)(a, b), codegen

    @intrinsic
    def divmod_magic(typingctx, n, d, magic, shift):
        """(n // d, n % d) for 0 <= n < 2^31 by a launch-constant divisor d, from its
        :func:`magic_divisor` numbers: a high multiply and a shift (``mul.hi.u32``, ``shr``) where a
        run-time division is ~20 instructions on a dependent chain."""

        def codegen(context, builder, sig, args):
            x, y, m, s = (context.cast(builder, v, t, types.uint32) for v, t in zip(args, sig.args))
            i64 = ir.IntType(64)
            wide = builder.mul(builder.zext(builder.shl(x, ir.Constant(_i32, 1)), i64), builder.zext(m, i64))
            q = builder.lshr(builder.trunc(builder.lshr(wide, ir.Constant(i64, 32)), _i32), s)
            r = builder.sub(x, builder.mul(q, y))
            return context.make_tuple(builder, sig.return_type, [q, r])

        return types.UniTuple(types.uint32, 2)(n, d, magic, shift), codegen

    @intrinsic
    def ld_shared(typingctx, smem, index):
        """``smem[index]`` (32-bit words), with 32-bit address arithmetic and no negative-index wraparound."""
        _check_word_array("ld_shared", smem)

        def codegen(context, builder, sig, args):
            address = _shared_address(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            asm = ir.InlineAsm(ir.FunctionType(_i32, [_i32]), "ld.shared.b32 $0, [$1];", "=r,r,~{memory}", side_effect=True)
            return builder.bitcast(builder.call(asm, [address]), context.get_value_type(sig.return_type))

        return smem.dtype(smem, index), codegen

    @intrinsic
    def st_shared(typingctx, smem, index, value):
        """``smem[index] = value`` (32-bit words), with 32-bit address arithmetic."""
        _check_word_array("st_shared", smem)

        def codegen(context, builder, sig, args):
            address = _shared_address(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            v = context.cast(builder, args[2], sig.args[2], types.int32)
            asm = ir.InlineAsm(
                ir.FunctionType(ir.VoidType(), [_i32, _i32]), "st.shared.b32 [$0], $1;", "r,r,~{memory}", side_effect=True
            )
            builder.call(asm, [address, v])
            return context.get_dummy_value()

        return types.void(smem, index, value), codegen

    @intrinsic
    def ld_shared_v4(typingctx, smem, index):
        """``smem[index : index + 4]`` as int32 in one 16-byte load (``index`` a multiple of 4)."""
        _check_word_array("ld_shared_v4", smem)

        def codegen(context, builder, sig, args):
            address = _shared_address(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            asm = ir.InlineAsm(
                ir.FunctionType(ir.LiteralStructType([_i32] * 4), [_i32]),
                "ld.shared.v4.b32 {$0, $1, $2, $3}, [$4];",
                "=r,=r,=r,=r,r,~{memory}",
                side_effect=True,
            )
            res = builder.call(asm, [address])
            return context.make_tuple(builder, sig.return_type, [builder.extract_value(res, i) for i in range(4)])

        return types.UniTuple(types.int32, 4)(smem, index), codegen

    def _st_global(count, cache):
        """``st.global{cache}.v{count}.b32``: ``count`` (2 or 4) 32-bit values to ``array[index:]`` in one store."""
        regs = ", ".join(f"${i + 1}" for i in range(count))
        text = f"st.global{cache}.v{count}.b32 [$0], {{{regs}}};"

        def typed(array, index, values):
            _check_word_array(f"st_global_v{count}", array)

            def codegen(context, builder, sig, args):
                ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1])
                elem = sig.args[0].dtype
                vals = []
                for v, t in zip(args[2:], sig.args[2:]):
                    x = context.cast(builder, v, t, elem)
                    vals.append(builder.bitcast(x, _i32) if isinstance(elem, types.Float) else x)
                asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [ir.IntType(64)] + [_i32] * count), text,
                                   "l," + "r," * count + "~{memory}", side_effect=True)
                builder.call(asm, [_global_address(builder, ptr)] + vals)
                return context.get_dummy_value()

            return types.void(array, index, *values), codegen

        if count == 2:
            return lambda typingctx, array, index, v0, v1: typed(array, index, (v0, v1))
        return lambda typingctx, array, index, v0, v1, v2, v3: typed(array, index, (v0, v1, v2, v3))

    st_global_v4 = intrinsic(_st_global(4, ""))
    st_global_v4.__doc__ = "``array[index : index + 4] = v0..v3`` in one 16-byte store (32-bit elements, 16-byte aligned)."
    st_global_cs_v4 = intrinsic(_st_global(4, ".cs"))
    st_global_cs_v4.__doc__ = "As st_global_v4, marked evict-first (``.cs``): streamed output that should not displace L2 data."
    st_global_v2 = intrinsic(_st_global(2, ""))
    st_global_v2.__doc__ = "``array[index], array[index + 1] = v0, v1`` in one 8-byte store (32-bit elements, 8-byte aligned)."
    st_global_cs_v2 = intrinsic(_st_global(2, ".cs"))
    st_global_cs_v2.__doc__ = "As st_global_v2, marked evict-first (``.cs``)."

    @intrinsic
    def ld_global_cg_v4(typingctx, array, index):
        """``array[index : index + 4]`` as int32 in one 16-byte load from L2 (``ld.global.cg``: past the SM's
        L1, which other SMs' stores do not update - for data another block of this launch wrote)."""
        _check_word_array("ld_global_cg_v4", array)

        def codegen(context, builder, sig, args):
            ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            asm = ir.InlineAsm(
                ir.FunctionType(ir.LiteralStructType([_i32] * 4), [ir.IntType(64)]),
                "ld.global.cg.v4.b32 {$0, $1, $2, $3}, [$4];",
                "=r,=r,=r,=r,l,~{memory}",
                side_effect=True,
            )
            res = builder.call(asm, [_global_address(builder, ptr)])
            return context.make_tuple(builder, sig.return_type, [builder.extract_value(res, i) for i in range(4)])

        return types.UniTuple(types.int32, 4)(array, index), codegen

    @intrinsic
    def st_shared_v2(typingctx, smem, index, v0, v1):
        """``smem[index], smem[index + 1] = v0, v1`` in one 8-byte store (``index`` even)."""
        _check_word_array("st_shared_v2", smem)

        def codegen(context, builder, sig, args):
            address = _shared_address(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            vals = [context.cast(builder, v, t, types.int32) for v, t in zip(args[2:], sig.args[2:])]
            asm = ir.InlineAsm(
                ir.FunctionType(ir.VoidType(), [_i32, _i32, _i32]),
                "st.shared.v2.b32 [$0], {$1, $2};",
                "r,r,r,~{memory}",
                side_effect=True,
            )
            builder.call(asm, [address] + vals)
            return context.get_dummy_value()

        return types.void(smem, index, v0, v1), codegen

    def _global_address(builder, ptr):
        global_ptr = builder.addrspacecast(ptr, ptr.type.pointee.as_pointer(1))
        return builder.ptrtoint(global_ptr, ir.IntType(64))

    def _ldmatrix(count):
        regs = ",".join(f"${i}" for i in range(count))
        text = f"ldmatrix.sync.aligned.m8n8.x{count}.shared.b16 {{{regs}}}, [${count}];"
        constraints = ",".join(["=r"] * count + ["r", "~{memory}"])

        def typer(typingctx, smem, index):
            sig = types.UniTuple(types.int32, count)(smem, index)

            def codegen(context, builder, sig, args):
                address = _shared_address(context, builder, sig.args[0], args[0], args[1], sig.args[1])
                fnty = ir.FunctionType(ir.LiteralStructType([_i32] * count), [_i32])
                asm = ir.InlineAsm(fnty, text, constraints, side_effect=True)
                res = builder.call(asm, [address])
                vals = [builder.extract_value(res, i) for i in range(count)]
                return context.make_tuple(builder, sig.return_type, vals)

            return sig, codegen

        return typer

    ldmatrix_x4 = intrinsic(_ldmatrix(4))
    ldmatrix_x4.__doc__ = """Four 8x8 b16 matrices from shared memory (``ldmatrix.sync.aligned.m8n8.x4``).

        Lane ``8 * i + r`` gives the address of row ``r`` of matrix ``i`` (16 bytes:
        four uint32 words starting at ``smem[index]``); every lane gets back, from each
        matrix ``i``, the word at row ``lane >> 2``, word ``lane & 3``.  For b1 tiles
        stored as rows of 32-byte k-chunks that is exactly the mma fragment.
        """
    ldmatrix_x2 = intrinsic(_ldmatrix(2))
    ldmatrix_x2.__doc__ = "Two 8x8 b16 matrices (``.x2``): lanes 0..15 give the row addresses."

    def _cp_async(nbytes, cache):
        """A global -> shared copy of ``nbytes`` without registers (``cp.async.{cache}``) to the shared
        byte address ``smem_address`` (:func:`smem_addr` of a word of ``smem``, which names the
        destination for the simulator); only ``src_bytes`` (0 or nbytes) are read, the rest is
        zero-filled - how ragged tile edges and image borders become zeros without a branch.
        (An address rather than an index: ptxas rebuilds the shared window's base - S2UR, ULEA - at
        every use of the array, so copy plans keep their addresses in registers instead.)"""

        def typer(typingctx, smem, smem_address, gmem, gmem_index, src_bytes):
            _check_word_array("cp.async", smem)
            sig = types.void(smem, smem_address, gmem, gmem_index, src_bytes)

            def codegen(context, builder, sig, args):
                saddr = context.cast(builder, args[1], sig.args[1], types.uint32)
                gptr = _element_pointer(context, builder, sig.args[2], args[2], args[3], sig.args[3])
                size = context.cast(builder, args[4], sig.args[4], types.int32)
                fnty = ir.FunctionType(ir.VoidType(), [_i32, ir.IntType(64), _i32])
                asm = ir.InlineAsm(fnty, f"cp.async.{cache}.shared.global [$0], [$1], {nbytes}, $2;",
                                   "r,l,r,~{memory}", side_effect=True)
                builder.call(asm, [saddr, _global_address(builder, gptr), size])
                return context.get_dummy_value()

            return sig, codegen

        return typer

    cp_async_16 = intrinsic(_cp_async(16, "cg"))
    cp_async_16.__doc__ = "Copy 16 bytes global -> shared (``cp.async.cg``: through L2 only); src_bytes 0 or 16."
    cp_async_4 = intrinsic(_cp_async(4, "ca"))
    cp_async_4.__doc__ = "Copy 4 bytes global -> shared (``cp.async.ca``: .cg takes 16 only); src_bytes 0 or 4."

    def _void_asm(text, doc):
        """An intrinsic of no operands that emits ``text`` (volatile, a memory clobber)."""

        @intrinsic
        def f(typingctx):
            def codegen(context, builder, sig, args):
                builder.call(ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), text, "~{memory}", side_effect=True), [])
                return context.get_dummy_value()

            return types.void(), codegen

        f.__doc__ = doc
        return f

    def _special_register(name, bits, doc):
        """An intrinsic of no operands that reads special register ``%name`` (volatile: read each time)."""
        ty = types.uint64 if bits == 64 else types.uint32

        @intrinsic
        def f(typingctx):
            def codegen(context, builder, sig, args):
                fnty = ir.FunctionType(ir.IntType(bits), [])
                return builder.call(ir.InlineAsm(fnty, f"mov.u{bits} $0, %{name};", "=l" if bits == 64 else "=r",
                                                 side_effect=True), [])

            return ty(), codegen

        f.__doc__ = doc
        return f

    global_timer_ns = _special_register("globaltimer", 64, "The GPU's global nanosecond timer (uint64).")
    sm_count = _special_register("nsmid", 32, "The number of SM ids (an upper bound on the SMs: ids may have gaps).")

    @cuda.jit(device=True, inline="always")
    def sleep_ns(ns):
        """Suspend the calling thread for about ``ns`` nanoseconds (``nanosleep`` naps on the global timer)."""
        t_end = global_timer_ns() + ns
        while global_timer_ns() < t_end:
            cuda.nanosleep(uint32(500))

    cp_async_commit = _void_asm("cp.async.commit_group;", "Close the group of cp.async copies issued so far.")
    fence_acq_rel_gpu = _void_asm(
        "fence.acq_rel.gpu;",
        "A GPU-scope acquire-release fence (lighter than ``cuda.threadfence``'s sequentially consistent one): "
        "around a flag's atomic, it publishes the writes this block made before and sees those that others did.")

    @functools.lru_cache(maxsize=None)
    def cp_async_wait(pending):
        """An intrinsic that waits until at most ``pending`` cp.async groups are in flight."""
        return _void_asm(f"cp.async.wait_group {int(pending)};", cp_async_wait.__doc__)

    @intrinsic
    def ballot(typingctx, predicate):
        """Bit ``lane`` of the result is the lane's predicate (!= 0); all 32 lanes take part.

        Written out (rather than ``cuda.ballot_sync``) so the member mask is an immediate:
        with a mask in a register ptxas calls a slow warp-synchronisation routine.
        """

        def codegen(context, builder, sig, args):
            value = context.cast(builder, args[0], sig.args[0], types.int32)
            asm = ir.InlineAsm(
                ir.FunctionType(_i32, [_i32]),
                "{ .reg .pred p; setp.ne.b32 p, $1, 0; vote.sync.ballot.b32 $0, p, 0xffffffff; }",
                "=r,r",
                side_effect=True,
            )
            return builder.call(asm, [value])

        return types.uint32(predicate), codegen

    @intrinsic
    def shfl_idx(typingctx, value, src_lane):
        """``value`` (as int32) as held by lane ``src_lane``; all 32 lanes take part (immediate mask)."""

        def codegen(context, builder, sig, args):
            v = context.cast(builder, args[0], sig.args[0], types.int32)
            src = context.cast(builder, args[1], sig.args[1], types.int32)
            asm = ir.InlineAsm(
                ir.FunctionType(_i32, [_i32, _i32]),
                "shfl.sync.idx.b32 $0, $1, $2, 0x1f, 0xffffffff;",
                "=r,r,r",
                side_effect=True,
            )
            return builder.call(asm, [v, src])

        return types.int32(value, src_lane), codegen

    @cuda.jit(device=True, inline="always")
    def f32_div_rn(x, y):
        """IEEE float32 x / y, rounded to nearest even (numpy's float32 division)."""
        return cuda.libdevice.fdiv_rn(x, y)

    @cuda.jit(device=True, inline="always")
    def f32_mul_rn(x, y):
        """float32 x * y with its own rounding: never contracted into an FMA."""
        return cuda.libdevice.fmul_rn(x, y)

    @cuda.jit(device=True, inline="always")
    def f32_add_rn(x, y):
        """float32 x + y with its own rounding: never contracted into an FMA."""
        return cuda.libdevice.fadd_rn(x, y)

    @cuda.jit(device=True, inline="always")
    def f32_rint(x):
        """Round float32 to the nearest integer, ties to even (numpy's ``rint``)."""
        return cuda.libdevice.rintf(x)

    # ---- warpgroup products (sm_90a) -----------------------------------------------------------

    wgmma_fence = _void_asm("wgmma.fence.sync.aligned;", "Order register and shared accesses before the next wgmma.")
    wgmma_commit = _void_asm("wgmma.commit_group.sync.aligned;", "Close the group of wgmma issued so far.")
    fence_proxy_async = _void_asm(
        "fence.proxy.async.shared::cta;",
        "Make this thread's shared-memory writes (cp.async included, once waited for) visible to wgmma's reads.")

    @functools.lru_cache(maxsize=None)
    def wgmma_wait(pending):
        """An intrinsic that waits until at most ``pending`` wgmma groups are in flight."""
        return _void_asm(f"wgmma.wait_group.sync.aligned {int(pending)};", wgmma_wait.__doc__)

    def _tuple_values(builder, value, n):
        return [builder.extract_value(value, i) for i in range(n)]

    @functools.lru_cache(maxsize=None)
    def zeros_i32(n):
        """An intrinsic returning a UniTuple of ``n`` int32 zeros (wgmma accumulators)."""

        @intrinsic
        def zeros(typingctx):
            def codegen(context, builder, sig, args):
                return context.make_tuple(builder, sig.return_type, [ir.Constant(_i32, 0)] * n)

            return types.UniTuple(types.int32, n)(), codegen

        return zeros

    @functools.lru_cache(maxsize=None)
    def pin_registers(n):
        """An intrinsic passing a UniTuple of ``n`` int32 through an empty volatile asm: after
        ``wgmma_wait(0)`` nothing reads the accumulators before the wait."""

        @intrinsic
        def pin(typingctx, acc):
            def codegen(context, builder, sig, args):
                cons = ",".join(["=r"] * n + [str(i) for i in range(n)] + ["~{memory}"])
                fnty = ir.FunctionType(ir.LiteralStructType([_i32] * n), [_i32] * n)
                res = builder.call(ir.InlineAsm(fnty, "", cons, side_effect=True), _tuple_values(builder, args[0], n))
                return context.make_tuple(builder, sig.return_type, _tuple_values(builder, res, n))

            return acc(acc), codegen

        return pin

    @functools.lru_cache(maxsize=None)
    def wgmma_b1(n):
        """An intrinsic ``acc = mma(acc, desc_a, desc_b, accumulate)`` for one
        ``wgmma m64n{n}k256 .b1 .and.popc`` of the calling warpgroup (``acc``: n / 2 int32 a thread;
        ``accumulate`` 0 ignores the old values).  Asynchronous: commit, then wait, before reading acc."""
        if n % 8 or not 8 <= n <= 256:
            raise ValueError(f"n: expected a multiple of 8 in 8..256, got {n}")
        regs = n // 2
        d = ",".join(f"${i}" for i in range(regs))
        text = (f"{{ .reg .pred p; setp.ne.b32 p, ${2 * regs + 2}, 0; "
                f"wgmma.mma_async.sync.aligned.m64n{n}k256.s32.b1.b1.and.popc {{{d}}}, ${2 * regs}, ${2 * regs + 1}, p; }}")
        cons = ",".join(["=r"] * regs + [str(i) for i in range(regs)] + ["l", "l", "r", "~{memory}"])
        fnty = ir.FunctionType(ir.LiteralStructType([_i32] * regs), [_i32] * regs + [ir.IntType(64)] * 2 + [_i32])

        @intrinsic
        def mma(typingctx, acc, desc_a, desc_b, accumulate):
            if not (isinstance(acc, types.UniTuple) and acc.count == regs):
                raise TypeError(f"wgmma_b1({n}): acc must be a UniTuple of {regs} int32, got {acc}")

            def codegen(context, builder, sig, args):
                da = context.cast(builder, args[1], sig.args[1], types.uint64)
                db = context.cast(builder, args[2], sig.args[2], types.uint64)
                acc_on = context.cast(builder, args[3], sig.args[3], types.int32)
                res = builder.call(ir.InlineAsm(fnty, text, cons, side_effect=True),
                                   _tuple_values(builder, args[0], regs) + [da, db, acc_on])
                return context.make_tuple(builder, sig.return_type, _tuple_values(builder, res, regs))

            return acc(acc, desc_a, desc_b, accumulate), codegen

        return mma

    @intrinsic
    def smem_addr(typingctx, smem, index):
        """Shared-window byte address of ``smem[index]`` (uint32)."""
        _check_word_array("smem_addr", smem)

        def codegen(context, builder, sig, args):
            return _shared_address(context, builder, sig.args[0], args[0], args[1], sig.args[1])

        return types.uint32(smem, index), codegen

    @intrinsic
    def smem_desc(typingctx, smem, index, fields):
        """wgmma matrix descriptor of the K-major tile at ``smem[index]``: its address / 16 in bits 0-13,
        OR'ed with ``fields`` (leading / stride byte offsets / 16 at bits 16 / 32, swizzle code at bit 62)."""
        _check_word_array("smem_desc", smem)

        def codegen(context, builder, sig, args):
            i64 = ir.IntType(64)
            addr = builder.zext(_shared_address(context, builder, sig.args[0], args[0], args[1], sig.args[1]), i64)
            start = builder.and_(builder.lshr(addr, ir.Constant(i64, 4)), ir.Constant(i64, 0x3FFF))
            return builder.or_(start, context.cast(builder, args[2], sig.args[2], types.uint64))

        return types.uint64(smem, index, fields), codegen

    @intrinsic
    def tuple_into(typingctx, array, start, values):
        """``array.ravel()[start + k] = values[k]`` for every k, each store at a constant offset (a loop
        indexing the tuple would spill it to the stack); ``array`` C-contiguous, e.g. a local array."""
        if not (isinstance(values, types.UniTuple) and isinstance(array, types.Array)):
            raise TypeError(f"tuple_into: expected an array and a UniTuple, got {array}, {values}")

        def codegen(context, builder, sig, args):
            data = context.make_array(sig.args[0])(context, builder, value=args[0]).data
            first = context.cast(builder, args[1], sig.args[1], types.intp)
            for k in range(sig.args[2].count):
                v = context.cast(builder, builder.extract_value(args[2], k), sig.args[2].dtype, sig.args[0].dtype)
                builder.store(v, builder.gep(data, [builder.add(first, ir.Constant(first.type, k))]))
            return context.get_dummy_value()

        return types.void(array, start, values), codegen
