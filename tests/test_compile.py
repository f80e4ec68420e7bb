"""No GPU needed: every kernel compiles to PTX (cc 8.0, 9.0) and SASS (nvJitLink); assert what matters.

- the b1 mma with AND is there (``BMMA.168256.AND.POPC``), no XOR form, no call into
  a routine (on sm_90 the XOR form becomes such a call plus two AND BMMAs: shown below);
- no local memory (stack, spills, lmem) - accumulators and fragments stay in registers;
- register counts are printed (pytest -s) for the record.
"""

import dataclasses
import itertools
import re

import pytest

from apnumba.kernels import pack, probe
from apnumba.kernels.apmm import WGMMA_N, TileConfig, apconv_kernel, apmm_kernel
from apnumba.kernels.ptx import SIMULATOR
from apnumba.matmul import _signature
from apnumba.tuning import default_config, hopper_config, hopper_conv_config, wgmma_config

pytestmark = pytest.mark.skipif(SIMULATOR, reason="PTX/SASS tests need the real numba.cuda, not the simulator")

sass = pytest.importorskip("apnumba.kernels.sass")
CCS = [(8, 0), (9, 0)]


def check_clean(c, bmma="BMMA.168256.AND.POPC", count=None, calls_ok=False):
    ops = c.opcodes()
    if bmma:
        assert ops[bmma] >= (count or 1), f"expected {bmma} in SASS, got {sorted(k for k in ops if 'MMA' in k)}"
    assert not [k for k in ops if "XOR" in k and "MMA" in k], "an XOR BMMA crept in"
    # An emulation routine (the XOR BMMA on sm_90, a slow warp-sync) is an absolute call;
    # ptxas also uses CALL.REL as a local jump in some loops, which is harmless.
    calls = [k for k in ops if k.startswith("CALL.ABS")]
    assert calls_ok or not calls, f"a call into a routine crept in (an emulation?): {calls}"
    assert c.stack_bytes == 0 and c.local_bytes == 0 and c.spill_bytes == 0, (
        f"local memory: stack {c.stack_bytes}, lmem {c.local_bytes}, spills {c.spill_bytes}"
    )
    assert not [k for k in ops if k.startswith(("LDL", "STL"))]


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize("shape", ["m16n8k256", "m8n8k128"])
def test_mma_intrinsics(cc, shape):
    c = sass.compile_kernel(probe.tile_kernel(shape, "and").py_func, probe.TILE_SIGNATURE, cc)
    assert f"mma.sync.aligned.{shape}.row.col.s32.b1.b1.s32.and.popc" in c.ptx
    check_clean(c, {"m16n8k256": "BMMA.168256.AND.POPC", "m8n8k128": "BMMA.88128.AND.POPC"}[shape])


@pytest.mark.parametrize("shape", ["m16n8k256", "m8n8k128"])
def test_xor_is_native_on_ampere_and_emulated_on_hopper(shape):
    """Why apnumba uses AND only: on sm_90 the XOR form is a call plus two AND BMMAs."""
    tag = {"m16n8k256": "168256", "m8n8k128": "88128"}[shape]
    fn = probe.tile_kernel(shape, "xor").py_func
    ampere = sass.compile_kernel(fn, probe.TILE_SIGNATURE, (8, 0)).opcodes()
    hopper = sass.compile_kernel(fn, probe.TILE_SIGNATURE, (9, 0)).opcodes()
    assert ampere[f"BMMA.{tag}.XOR.POPC"] == 1
    assert hopper[f"BMMA.{tag}.XOR.POPC"] == 0
    assert hopper[f"BMMA.{tag}.AND.POPC"] == 2
    assert any(k.startswith("CALL.ABS") for k in hopper)


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
def test_peak_microbenchmark_kernel(cc):
    c = sass.compile_kernel(probe.peak_kernel("m16n8k256", "and", 8).py_func, probe.PEAK_SIGNATURE, cc)
    check_clean(c, count=8)


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_pack_kernels(cc, dtype):
    sig = (f"void({dtype}[::1], int32, int32, int32, float32[::1], int32, int32, int32, int32, "
           "uint32[::1], int32, int32[::1])")
    c = sass.compile_kernel(pack.pack_rows_kernel.py_func, sig, cc)
    assert "vote.sync.ballot.b32" in c.ptx and "div.rn.f32" in c.ptx and "cvt.rni.f32.f32" in c.ptx
    # The only calls are IEEE division's slow path (denormal / huge operands), taken on a branch.
    check_clean(c, bmma=None, calls_ok=True)
    assert c.opcodes()["VOTE.ANY"] >= 8  # ballots with an immediate mask: no warp-sync routine
    u = sass.compile_kernel(
        pack.unpack_rows_kernel.py_func, "void(uint32[::1], int32, int32, int32, int32, int32, int32[::1])", cc
    )
    check_clean(u, bmma=None)
    for bits, enc in ((8, pack.ENC_SIGNED), (2, pack.ENC_UNSIGNED), (1, pack.ENC_BINARY)):
        f = sass.compile_kernel(
            pack.pack_patches_kernel(bits, enc).py_func,
            f"void({dtype}[::1], int32[::1], int32[::1], float32[::1], int32, uint32[::1], int32, int32[::1])", cc,
        )
        check_clean(f, bmma=None, calls_ok=True)
        # The plane loop unrolled (at least one ballot a plane in the code), and one store of a plane word
        # per lane, not one per plane (LLVM may unroll the word loop once more: up to 4 stores in all).
        ops = f.opcodes()
        assert ops["VOTE.ANY"] >= bits and ops["STG.E"] <= 4, (ops["VOTE.ANY"], ops["STG.E"])


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
def test_pack_bytes_kernels(cc):
    for bits, enc, segment in ((8, pack.ENC_SIGNED, 8), (8, pack.ENC_UNSIGNED, 32), (1, pack.ENC_BINARY, 1)):
        rows = sass.compile_kernel(
            pack.pack_rows_bytes_kernel(bits, enc, segment).py_func,
            "void(float32[::1], int32, int32, int32, float32[::1], int32, int32, uint32[::1], int32, int32[::1])", cc,
        )
        pixels = sass.compile_kernel(
            pack.quantize_pixels_bytes_kernel(bits, enc).py_func,
            "void(float16[::1], int32[::1], int32[::1], float32[::1], int32, uint32[::1], int32, int32[::1])", cc,
        )
        for c in (rows, pixels):
            check_clean(c, bmma=None, calls_ok=True)
            assert "vote.sync" not in c.ptx  # no ballots: a code is a byte
            if enc != pack.ENC_BINARY:  # (a +-1 code needs only the sign: no division, no rounding)
                assert "div.rn.f32" in c.ptx and "cvt.rni.f32.f32" in c.ptx
        assert rows.ptx.count("shfl.sync.idx.b32") >= segment.bit_length() - 1  # the segment's butterfly
        assert "shfl.sync" not in pixels.ptx and "atom." not in pixels.ptx  # a pixel a thread: its sum stored once


# Byte-packed operands: one int8 m16n8k32 per 32 bytes (IMMA), on both architectures, APMM and APConv.
@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize("mma", ["s8.s8", "s8.u8", "u8.s8", "u8.u8"])
def test_apmm_int8(cc, mma):
    cfg = default_config(1, 1, 4096, 4096, 4096)
    c = sass.compile_kernel(apmm_kernel(1, 1, cfg, False, mma).py_func, _signature(False), cc)
    assert f"mma.sync.aligned.m16n8k32.row.col.s32.{mma}.s32" in c.ptx
    check_clean(c, bmma=f"IMMA.16832.{mma.upper()}", count=cfg.mma_per_step(1, 1))
    assert not [k for k in c.opcodes() if k.startswith("BMMA")]


@pytest.mark.parametrize("out", ["pack", "pack_max", "f32"])
@pytest.mark.parametrize("mma", ["s8.s8", "b1"])
def test_apconv_word_taps_sm90(out, mma):
    """A first layer as the network runs it: ResNet-18's 7x7/2 stem on an RGB image's bytes (one word a
    tap: four 4-byte cp.async a 16-byte chunk of K), the fused epilogue; and the same on bit planes
    (<= 32 channels a tap).  The weights' chunks stay 16-byte copies."""
    from apnumba.conv import _signature as conv_signature, conv_config
    from apnumba.kernels.apmm import apconv_kernel

    cfg = conv_config(1, 1, 64, 8 * 112 * 112, 56 * 32, packed=out.startswith("pack"))
    epilogue = (2, 0, 0, 0, True) if out.startswith("pack") else None
    c = sass.compile_kernel(apconv_kernel(1, 1, cfg, out, mma, epilogue, word_taps=True).py_func, conv_signature(out), (9, 0))
    check_clean(c, bmma="IMMA.16832.S8.S8" if mma != "b1" else "BMMA.168256.AND.POPC", count=cfg.mma_per_step(1, 1))
    assert re.search(r"cp\.async\.ca\.shared\.global \[%r\d+\], \[%rd\d+\], 4, %r\d+;", c.ptx)
    assert re.search(r"cp\.async\.cg\.shared\.global \[%r\d+\], \[%rd\d+\], 16, %r\d+;", c.ptx)
    with pytest.raises(ValueError, match="int8 operands are one plane"):
        apconv_kernel(2, 1, cfg, out, "s8.s8", epilogue)


# The specialisations the library ships by default: every (p, q) at its large-problem tile,
# and the small-problem tiles (K split across warps, odd n-tiles, plane groups) for a few.
LARGE = [(p, q, default_config(p, q, 8192, 8192, 8192)) for p, q in itertools.product(range(1, 9), repeat=2)]
SMALL = [
    (p, q, default_config(p, q, M, N, K))
    for (p, q), (M, N, K) in itertools.product([(1, 2), (2, 2), (1, 4), (1, 1)], [(64, 1024, 1024), (4096, 8, 9216)])
] + [
    (2, 3, TileConfig(1, 1, 1, 3, 2, 1)),
    (8, 8, TileConfig(2, 2, 1, 1, 4, 4, 2)),
    (1, 2, TileConfig(2, 4, 4, 2, 4, 0, 1, 4, raster=8, stream_out=True)),
]


def _apmm_sass(p, q, cfg, out_float, cc):
    return sass.compile_kernel(apmm_kernel(p, q, cfg, out_float).py_func, _signature(out_float), cc)


@pytest.mark.parametrize("p,q,cfg", LARGE, ids=lambda v: str(v.short()) if isinstance(v, TileConfig) else str(v))
def test_apmm_large_tiles_sm90(p, q, cfg):
    c = _apmm_sass(p, q, cfg, False, (9, 0))
    # every mma of a k-step unrolled: pg * q * mt * nt per loop body (ptxas may unroll further)
    check_clean(c, count=cfg.mma_per_step(p, q))
    assert "ldmatrix.sync.aligned.m8n8.x" in c.ptx and "cp.async.cg.shared.global" in c.ptx
    print(f"apmm w{p}a{q} {cfg.short()}: {c.registers} registers")


@pytest.mark.parametrize("p,q,cfg", SMALL, ids=lambda v: str(v.short()) if isinstance(v, TileConfig) else str(v))
@pytest.mark.parametrize("out_float", [False, True], ids=["i32", "f32"])
def test_apmm_small_tiles_sm90(p, q, cfg, out_float):
    c = _apmm_sass(p, q, cfg, out_float, (9, 0))
    check_clean(c, count=cfg.mma_per_step(p, q))
    print(f"apmm w{p}a{q} {cfg.short()} {'f32' if out_float else 'i32'}: {c.registers} registers")


@pytest.mark.parametrize("p,q", [(1, 1), (1, 2), (2, 2), (8, 8)])
def test_apmm_sm80(p, q):
    cfg = default_config(p, q, 8192, 8192, 8192)
    c = _apmm_sass(p, q, cfg, True, (8, 0))
    check_clean(c, count=cfg.mma_per_step(p, q))


WGMMA = [(1, 1, 3, 2), (1, 2, 3, 2), (2, 2, 3, 2), (1, 4, 3, 2), (4, 4, 2, 2), (8, 8, 2, 2), (3, 5, 2, 2),
         (1, 2, 2, 2), (2, 2, 2, 4), (1, 8, 3, 2), (1, 2, 3, 1), (2, 2, 2, 2), (2, 3, 2, 2)]


@pytest.mark.parametrize("p,q,groups,steps", WGMMA, ids=[f"w{p}a{q}-{g}wg-{s}" for p, q, g, s in WGMMA])
def test_apmm_wgmma_sm90a(p, q, groups, steps):
    """The warpgroup tiles (sm_90a): per k-step one BGMMA m64n(q * block_n)k256 AND per weight plane of a
    pass, no XOR, no routine, no stack; two-warpgroup tiles keep everything in registers, three-warpgroup
    tiles (384 threads: at most 168 registers) may spill a few words outside the main loop."""
    cfg = wgmma_config(p, q, groups, steps)
    c = sass.compile_kernel(apmm_kernel(p, q, cfg, False), _signature(False), (9, 0, "a"))
    ops = c.opcodes()
    shape = f"BGMMA.64x{q * cfg.block_n}x256.AND.POPC"
    assert c.sass.count(shape) >= cfg.group(p), f"expected {shape} in SASS, got {sorted(k for k in ops if 'MMA' in k)}"
    assert ".target sm_90a" in c.ptx and "wgmma.mma_async.sync.aligned" in c.ptx
    assert not [k for k in ops if ("XOR" in k and "MMA" in k) or k.startswith("CALL.ABS")]  # (ISETP.XOR is the epilogue's)
    assert c.stack_bytes == 0 or groups == 3
    assert c.spill_bytes == 0 if groups == 2 else c.spill_bytes <= 160, f"{c.spill_bytes} bytes of spills"
    assert c.registers <= (168 if groups == 3 else 255)
    print(f"apmm w{p}a{q} {cfg.short()}: {c.registers} registers, {c.spill_bytes} bytes spilled")


def test_apmm_staggered_start_sm90a():
    """The H100's default w1a1 tile: odd blocks of the first wave nap on the global timer before they
    start (NANOSLEEP in SASS), and the output is stored with evict-first; the products are unchanged."""
    cfg = hopper_config(1, 1, 8192, 8192, 8192)
    c = sass.compile_kernel(apmm_kernel(1, 1, cfg, False), _signature(False), (9, 0, "a"))
    ops = c.opcodes()
    assert cfg.stagger_us and ops["NANOSLEEP"] >= 1 and "%globaltimer" in c.ptx and "%nsmid" in c.ptx
    assert c.sass.count("BGMMA.64x256x256.AND.POPC") >= 1 and "st.global.cs.v4" in c.ptx
    assert not [k for k in ops if ("XOR" in k and "MMA" in k) or k.startswith("CALL.ABS")]  # (ISETP.XOR is the epilogue's)
    assert c.registers <= 168 and c.spill_bytes <= 160, (c.registers, c.spill_bytes)


@pytest.mark.parametrize("out_float", [False, True], ids=["i32", "f32"])
def test_apmm_persistent_tile_sm90a(out_float):
    """The H100's default w2a2 tile is persistent: blocks loop over the output tiles (a backward branch around
    the products and the epilogue), whole tiles store straight from the accumulators in 8-byte stores, the
    others through the shared tile (16-byte stores); clean SASS, no local memory."""
    cfg = hopper_config(2, 2, 8192, 8192, 8192)
    assert cfg.persistent and cfg.threads == 256 and not hopper_config(1, 2, 8192, 8192, 8192).persistent
    c = sass.compile_kernel(apmm_kernel(2, 2, cfg, out_float), _signature(out_float), (9, 0, "a"))
    check_clean(c, None)
    assert c.sass.count("BGMMA.64x128x256.AND.POPC") >= 2
    assert "st.global.cs.v2.b32" in c.ptx and "st.global.cs.v4.b32" in c.ptx
    print(f"apmm w2a2 {cfg.short()}: {c.registers} registers")


def test_persistent_tiles_are_checked():
    with pytest.raises(ValueError, match="persistent tiles store straight from the accumulators"):
        apmm_kernel(4, 4, dataclasses.replace(wgmma_config(4, 4, 2, 2), persistent=True), False)  # two plane passes
    with pytest.raises(ValueError, match="persistent tiles store straight from the accumulators"):
        apmm_kernel(1, 1, TileConfig(1, 1, 1, 2, 2, 0, 2, persistent=True), False)  # K split over warps
    with pytest.raises(ValueError, match="persistent are for APMM"):
        apconv_kernel(1, 1, TileConfig(persistent=True), "i32")


def test_wgmma_products_have_a_wgmma_shape():
    """A b1 wgmma's n is 8, 16, 24 or a multiple of 16 up to 256 (ptxas rejects m64n120k256: w2a3's tiles once
    asked for it and failed to compile); every tile the tuner can pick has one, the kernel refuses others, and
    w2a3's default compiles."""
    for p, q in itertools.product(range(1, 9), repeat=2):
        tiles = [wgmma_config(p, q, g, s) for g in (2, 3) for s in (1, 2, 4)]
        tiles += [hopper_config(p, q, 8192, 8192, 8192), hopper_conv_config(p, q, 256, 256 * 56 * 56, 9 * 256)]
        for cfg in tiles:
            assert cfg is None or q * cfg.block_n in WGMMA_N, (p, q, cfg.short())
    with pytest.raises(ValueError, match="wgmma takes b1 planes"):
        apmm_kernel(2, 3, TileConfig(8, 1, 1, 5, 4, 0, 1, 2, wgmma=True), False)  # n = 3 x 40 = 120
    cfg = hopper_config(2, 3, 8192, 8192, 8192)
    c = sass.compile_kernel(apmm_kernel(2, 3, cfg, False), _signature(False), (9, 0, "a"))
    check_clean(c, None)
    assert c.sass.count(f"BGMMA.64x{3 * cfg.block_n}x256.AND.POPC") >= 2


def test_wgmma_tiles_are_checked():
    with pytest.raises(ValueError, match="wgmma"):
        TileConfig(4, 2, 1, 8, 4, wgmma=True)
    with pytest.raises(ValueError, match="wgmma"):
        apmm_kernel(1, 8, TileConfig(4, 1, 1, 8, 4, wgmma=True), False)  # 8 planes x 64 columns > 256
    with pytest.raises(ValueError, match="wgmma takes b1 planes"):
        apconv_kernel(1, 1, TileConfig(4, 1, 1, 8, 4, wgmma=True), "i32", "s8.s8")
    assert wgmma_config(1, 2, 3, 2).short() == "12x1w1x16t8sx2b1W"
    assert wgmma_config(2, 2, 2, 2).block_n == 64 and wgmma_config(8, 8, 2, 2).passes(8) == 4
    # what an H100 runs by default: three warpgroups where one pass holds every weight plane, else two
    for p, q in WGMMA_BITS_DEFAULT:
        cfg = hopper_config(p, q, 8192, 8192, 8192)
        assert (p, q, cfg.threads // 128, cfg.steps) in WGMMA, (p, q, cfg.short())
    assert hopper_config(1, 2, 8192, 8, 8192) is None and hopper_config(1, 2, 8192, 8192, 2048) is None
    # one-pass tiles stagger their start and stream their output; two-pass tiles do neither
    assert hopper_config(1, 1, 8192, 8192, 8192).short() == "12x1w1x32t8sx2cb1d7W"
    assert hopper_config(4, 4, 8192, 8192, 8192).stagger_us == 0
    with pytest.raises(ValueError, match="stagger_us: expected 0 to 1000"):
        TileConfig(stagger_us=-1)
    with pytest.raises(ValueError, match="stagger_us and persistent are for APMM"):
        apconv_kernel(1, 1, TileConfig(stagger_us=5), "i32")
    # convolutions: 64 pixels x 128 weight rows a stage where the grid has >= 4 blocks per SM, one plane pass
    assert hopper_conv_config(1, 2, 256, 256 * 14 * 14, 9 * 256).short() == "8x1w1x8t4sW"
    assert hopper_conv_config(2, 2, 256, 256 * 14 * 14, 9 * 256).short() == "4x1w1x8t4sb3W"
    assert hopper_conv_config(1, 2, 64, 256 * 56 * 56, 9 * 64).block_m == 64
    assert hopper_conv_config(1, 2, 512, 8 * 7 * 7, 9 * 512) is None and hopper_conv_config(4, 4, 256, 256 * 196, 2304) is None
    assert hopper_conv_config(1, 2, 256, 256 * 14 * 14, 256) is None  # a 1x1 conv of one k-step


# (p, q, M, output, blocks per SM the registers must leave room for: what the session-13 kernels had)
CONV_WGMMA = [(1, 2, 256, "pack", 2), (1, 2, 256, "i32", 2), (1, 2, 64, "pack_max", 4), (2, 2, 512, "pack", 3),
              (2, 2, 64, "f32", 3), (1, 1, 256, "pack", 2), (1, 4, 128, "i32", 1)]


@pytest.mark.parametrize("p,q,M,out,blocks", CONV_WGMMA, ids=[f"w{c[0]}a{c[1]}-{c[2]}-{c[3]}" for c in CONV_WGMMA])
def test_apconv_wgmma_sm90a(p, q, M, out, blocks):
    """The convolution tiles an H100 picks at batch 256: one BGMMA per weight plane of a k-step, no XOR,
    no routine, nothing on the stack (two planes' accumulators in one warpgroup of 128 threads: up to ~190 registers),
    and registers for as many blocks per SM as before (the column terms gathered in the main loop hold registers
    through it: on one-plane tiles only, where that costs no block - w1a2 96 -> 124 of 128)."""
    from apnumba.conv import _signature as conv_signature

    cfg = hopper_conv_config(p, q, M, 256 * 14 * 14, 9 * 256)
    epilogue = (2, 0, 0, 0, M <= cfg.block_m, 0 if out == "pack_max" else 3) if out.startswith("pack") else None
    c = sass.compile_kernel(apconv_kernel(p, q, cfg, out, "b1", epilogue), conv_signature(out), (9, 0, "a"))  # (its bounds)
    ops = c.opcodes()
    shape = f"BGMMA.64x{q * cfg.block_n}x256.AND.POPC"
    assert c.sass.count(shape) == cfg.group(p), f"expected {shape} in SASS, got {sorted(k for k in ops if 'MMA' in k)}"
    assert not [k for k in ops if ("XOR" in k and "MMA" in k) or k.startswith("CALL.ABS")]  # (ISETP.XOR is the epilogue's)
    assert c.stack_bytes == 0 and c.spill_bytes == 0 and c.registers <= 200, (c.registers, c.spill_bytes)
    if out == "pack":  # u2 by thresholds: each plane's bit straight from the comparisons (reference.planes_by_thresholds)
        assert any(k.startswith("ISETP") and "XOR" in k for k in ops), sorted(k for k in ops if k.startswith("ISETP"))
    per_sm = 65536 // (cfg.threads * -(-c.registers // 8) * 8)  # (registers are allocated 8 a thread at a time)
    assert per_sm >= blocks, f"{c.registers} registers: {per_sm} blocks of {cfg.threads} threads per SM, expected {blocks}"
    print(f"apconv w{p}a{q} {cfg.short()} {out}: {c.registers} registers")
    assert hopper_config(1, 2, 4096, 4096, 4096) is None and hopper_config(1, 2, 8192, 4096, 4100) is not None


WGMMA_BITS_DEFAULT = [(1, 1), (1, 2), (2, 2), (1, 4), (4, 4), (8, 8), (3, 5), (1, 8), (2, 3)]


CONV = [
    (1, 2, (256, 8 * 28 * 28, 256 * 9)), (2, 2, (512, 256 * 7 * 7, 512 * 9)),
    (1, 2, (64, 8 * 112 * 112, 256 * 49)), (1, 1, (128, 16 * 16, 1024 * 9)), (8, 8, (64, 8 * 56 * 56, 256 * 9)),
]


@pytest.mark.parametrize("p,q,shape", CONV, ids=[f"w{c[0]}a{c[1]}-{c[2][0]}" for c in CONV])
@pytest.mark.parametrize("out", ["i32", "f32", "pack"])
def test_apconv_sm90(p, q, shape, out):
    _check_apconv(p, q, shape, out)


@pytest.mark.parametrize("p,q,shape", [CONV[0], CONV[4]], ids=["w1a2", "w8a8"])
@pytest.mark.parametrize("out", ["pack_max", "pack_avg"])
def test_apconv_fused_pooling_sm90(p, q, shape, out):
    _check_apconv(p, q, shape, out)


@pytest.mark.parametrize("out,levels", [("pack", 0), ("pack", 3), ("pack_max", 0)])
def test_apconv_wide_tile_epilogue_sm90(out, levels):
    """Four 32-channel words per pixel (block_m 128, as VGG's conv2 runs): the channel constants - and
    with integer thresholds (levels > 0) each channel's sign and thresholds - stay in registers (the
    pooling path once kept them in an 80-byte stack array); the threshold epilogue has no float math."""
    from apnumba.kernels.apmm import TileConfig

    c = _check_apconv(1, 2, None, out, TileConfig(2, 4, 4, 2, 4), levels)
    floats = sum(v for op, v in c.opcodes().items() if op.startswith(("FMUL", "FADD", "FRND")))  # (I2F/F2I: divisions)
    assert (floats == 0) == (levels > 0), c.opcodes()


@pytest.mark.parametrize("bits,levels", [(8, 0), (3, 7)], ids=["u8-float", "u3-thresholds"])
def test_apconv_bytes_out_sm90(bits, levels):
    """The fused epilogue writing code bytes for an int8 next layer (a hidden FC before an 8-bit last layer,
    as a 1x1 conv): four lanes a word by two shuffles, a warp's code sum by five - no ballots, no local memory."""
    from apnumba.conv import _signature as conv_signature
    from apnumba.kernels.apmm import TileConfig, apconv_kernel

    cfg = TileConfig(2, 2, 2, 2, 4)
    epilogue = (bits, 0, 0, 0, True, levels, True)  # unsigned out, no residual, whole rows, bytes
    c = sass.compile_kernel(apconv_kernel(1, 2, cfg, "pack", "b1", epilogue).py_func, conv_signature("pack"), (9, 0))
    check_clean(c, count=cfg.mma_per_step(1, 2))
    ops = c.opcodes()
    assert "VOTE.ANY" not in ops and ops.get("SHFL.IDX", 0) >= 7 * cfg.block_m // 32, ops


def _check_apconv(p, q, shape, out, cfg=None, levels=0):
    from apnumba.conv import _signature as conv_signature, conv_config
    from apnumba.kernels.apmm import apconv_kernel

    cfg = cfg or conv_config(p, q, *shape, packed=out.startswith("pack"))
    packed = out.startswith("pack")
    # (out precision, residual precision, whole rows): u2 with a u2 residual, or s4 over several blocks
    epilogue = ((2, 0, 0 if out != "pack" or levels else 2, 0, True) if p == 1 else (4, 1, 0, 0, False)) if packed else None
    epilogue = epilogue + (levels,) if levels else epilogue
    c = sass.compile_kernel(apconv_kernel(p, q, cfg, out, "b1", epilogue).py_func, conv_signature(out), (9, 0))
    check_clean(c, count=cfg.mma_per_step(p, q))
    if packed:
        # the next layer's words come from ballots, one per output plane of every word of the tile, unrolled
        # (the pooling path keeps its word loop: four pixels' values a word are already a long body)
        words = cfg.block_m // 32 if out == "pack" else 1
        assert c.opcodes()["VOTE.ANY"] >= epilogue[0] * words, c.opcodes()["VOTE.ANY"]
        assert ("ATOMG" in str(c.opcodes()) or "RED." in str(c.opcodes())) == (not epilogue[4])
    print(f"apconv w{p}a{q} {cfg.short()} {out}: {c.registers} registers")
    return c


@pytest.mark.parametrize("bits,enc,out_bits,out_enc,k", [(2, 0, 2, 0, 3), (8, 1, 4, 0, 2), (1, 2, 1, 2, 3)])
def test_avg_pool_kernels(bits, enc, out_bits, out_enc, k):
    from apnumba.kernels import packed_ops

    kernel = packed_ops.avg_pool_kernel(bits, enc, out_bits, out_enc, k)
    c = sass.compile_kernel(kernel.py_func, "void(uint32[::1], int32[::1], int32[::1], float32, uint32[::1], int32[::1])",
                            (9, 0))
    check_clean(c, bmma=None)
    ops = c.opcodes()
    assert ops["VOTE.ANY"] >= out_bits  # the output planes' ballots unrolled
    loads = sum(v for op, v in ops.items() if op.startswith("LDG"))
    # every tap's plane words loaded in straight-line code, none behind a branch of its own (ptxas may
    # keep a long plane loop rolled: count two planes a tap at least)
    assert loads >= k * k * min(bits, 2), loads


@pytest.mark.parametrize("bits,enc,k", [(2, 0, 3), (3, 1, 3), (1, 2, 2), (8, 0, 3)])
def test_max_pool_kernel_is_bit_sliced(bits, enc, k):
    """Max pooling: whole words, one thread each - no ballots, every tap's planes loaded unrolled, no local memory."""
    from apnumba.kernels import packed_ops

    c = sass.compile_kernel(packed_ops.max_pool_kernel(bits, enc, k).py_func,
                            "void(uint32[::1], int32[::1], uint32[::1], int32[::1])", (9, 0))
    check_clean(c, bmma=None)
    ops = c.opcodes()
    assert ops["VOTE.ANY"] == 0 and sum(v for op, v in ops.items() if op.startswith("LDG")) >= k * k * bits


@pytest.mark.parametrize("name,sig", [
    ("add_kernel", "void(uint32[::1], uint32[::1], int32, int32, int32, int32[::1], float32, float32, uint32[::1], int32[::1])"),
    ("image_rowsum_kernel", "void(int32[::1], int32, int32, int32[::1])"),
    ("requantize_kernel", "void(int32[::1], int32, int32, int32, float32[::1], float32[::1], int32[::1], uint32[::1], int32[::1])"),
])
def test_packed_ops(name, sig):
    from apnumba.kernels import packed_ops

    c = sass.compile_kernel(getattr(packed_ops, name).py_func, sig, (9, 0))
    check_clean(c, bmma=None)


def test_96_channel_layers_take_96_row_tiles():
    """VGG's first layer (96 channels) runs in 96-row tiles - three m16 tiles a warp, three whole words
    a pixel, no padding channels (17% faster than 128-row tiles at batch 8 and 256 on the H100) - and
    compiles clean as the network runs it (image bytes, word taps, fused 2x2 max pool); channel counts
    that 128-row tiles fill keep power-of-two tiles."""
    from apnumba.conv import _signature as conv_signature, conv_config
    from apnumba.kernels.apmm import apconv_kernel
    from apnumba.tuning import candidates

    for batch in (2, 8, 256):
        cfg = conv_config(1, 1, 96, batch * 224 * 224, 9 * 32, packed=True)
        assert cfg.block_m == 96 and cfg.mt == 3, cfg.short()
    c = sass.compile_kernel(apconv_kernel(1, 1, cfg, "pack_max", "s8.s8", (2, 0, 0, 0, True), word_taps=True).py_func,
                            conv_signature("pack_max"), (9, 0))
    check_clean(c, bmma="IMMA.16832.S8.S8", count=cfg.mma_per_step(1, 1))
    for M in (64, 128, 256, 384, 512, 1000, 4096):
        assert all(cfg.mt != 3 for cfg in candidates(1, 2, M, 8 * 28 * 28, 9 * 256, limit=64, three_m_tiles=True)), M
    # APMM keeps power-of-two tiles (96-row ones were measured for convolutions only)
    assert all(cfg.mt != 3 for cfg in candidates(1, 2, 96, 256, 4096, limit=64))


def test_conv_config_keeps_one_k_step_a_stage_on_large_grids():
    """Grids with blocks for two per SM get one k-step a stage (more cost ~40 registers and one block per
    SM: 1.3-1.8x slower on ResNet-18's 3x3 layers at batch 256 on the H100)."""
    from apnumba.conv import conv_config
    from apnumba.tuning import SMS

    for M, N, C in [(256, 256 * 14 * 14, 256), (512, 256 * 7 * 7, 512), (64, 256 * 56 * 56, 64)]:
        cfg = conv_config(1, 2, M, N, 9 * C, packed=True)
        assert cfg.blocks(M, N) >= 2 * SMS and cfg.steps == cfg.warps_k, cfg.short()


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize("out", ["i32", "pack"])
def test_apconv_split_k(cc, out):
    """K split over blocks: each stores its partial tile (16-byte stores), thread 0 counts the block in with
    one wrapping atomic increment between two acquire-release fences (no sequentially consistent one), the
    last block reads the others' slots past L1 (ld.global.cg: LDG ... STRONG.GPU) - still no local memory,
    and two blocks of 256 threads per SM as without the split.  Without a split none of it is there."""
    from apnumba.conv import _signature as conv_signature

    base = TileConfig(2, 4, 2, 2, 4, stage_steps=4)
    epilogue = (2, 0, 0, 0, False, 3) if out == "pack" else None
    split = sass.compile_kernel(apconv_kernel(1, 2, dataclasses.replace(base, split_k=3), out, "b1", epilogue).py_func,
                                conv_signature(out), cc)
    plain = sass.compile_kernel(apconv_kernel(1, 2, base, out, "b1", epilogue).py_func, conv_signature(out), cc)
    # (sm_80: the column terms' lane shuffles are a routine call there, with or without a split)
    check_clean(split, count=base.mma_per_step(1, 2), calls_ok=cc < (9, 0))
    ops, plain_ops = split.opcodes(), plain.opcodes()
    assert "atom.global.inc.u32" in split.ptx and split.ptx.count("fence.acq_rel.gpu;") == 2 and "ld.global.cg.v4" in split.ptx
    assert "membar.gl" not in split.ptx and "fence.sc" not in split.ptx
    assert ops["ATOMG.E.INC.STRONG.GPU"] == 1 and any(k.startswith("LDG.E.128.STRONG.GPU") for k in ops), sorted(ops)
    assert not [k for k in plain_ops if k.startswith(("ATOMG.E.INC", "MEMBAR"))] and "ld.global.cg" not in plain.ptx
    assert split.registers <= 128, split.registers
    # one build serves every share count (the kernel reads it from the grid)
    assert apconv_kernel(1, 2, dataclasses.replace(base, split_k=7), out, "b1", epilogue) is \
        apconv_kernel(1, 2, dataclasses.replace(base, split_k=2), out, "b1", epilogue)


def test_split_k_config(monkeypatch):
    """Where the H100 default splits K: int32 / float32 convolutions of few wgmma tiles and >= 12 four-step
    k-tiles (APNN-TC's C = K = 1536 and 2048 at 16x16), two shares; not at C = K = 1024 (slower there), not
    for packed outputs, not for weights of several plane passes.  Bad shares are refused."""
    import apnumba.conv
    from apnumba.conv import conv_config
    from apnumba.tuning import hopper_split_conv_config

    for p, q in [(1, 2), (2, 2), (1, 3), (1, 4)]:
        for C in (1536, 2048):
            cfg = hopper_split_conv_config(p, q, C, 256, 9 * C)
            assert cfg.short() == "8x1w1x8t4sx4Wz2" and cfg.blocks(C, 256) * 2 <= 132, (p, q, C, cfg.short())
        assert hopper_split_conv_config(p, q, 1024, 256, 9 * 1024) is None
    assert hopper_split_conv_config(4, 4, 2048, 256, 9 * 2048) is None
    monkeypatch.setattr(apnumba.conv, "_wgmma_ok", lambda mma="b1": mma == "b1")  # (as on an H100)
    assert conv_config(1, 2, 2048, 256, 9 * 2048).split_k == 2 and conv_config(1, 2, 2048, 256, 9 * 2048, packed=True).split_k == 1
    assert conv_config(1, 2, 2048, 256, 9 * 2048, mma="s8.s8").split_k == 1
    monkeypatch.undo()
    # the mma.sync tiles of small convolutions have eight warps at least (one-warp blocks were 1.1-1.8x slower)
    for C in (128, 256, 512):
        assert conv_config(1, 2, C, 256, 9 * C).threads >= 256
    assert TileConfig(split_k=3).launch_grid(100, 50) == (1, 1, 3) and TileConfig(split_k=3).short().endswith("z3")
    assert TileConfig(2, 2, 1, 1, split_k=2).split_words(40, 20) == 4 * 2 * 32 * 16  # 2 x 2 tiles, 2 shares
    for bad in (0, 17):
        with pytest.raises(ValueError, match="split_k: expected 1 to 16"):
            TileConfig(split_k=bad)
    with pytest.raises(ValueError, match="split_k is for convolutions"):
        apmm_kernel(1, 2, TileConfig(split_k=2), False)


def _ldsm_destinations(c):
    """The destination registers of the SASS's ldmatrix loads, in order."""
    return re.findall(r"LDSM\.16\.M88\.[24] (R\d+),", c.sass)


def test_one_wave_conv_tiles_keep_their_fragments_apart():
    """A conv grid of one wave gets launch bounds (min_blocks=1): then ptxas gives a stage's ldmatrix loads
    registers of their own.  Built without them (as before), it reloads the k-step's second A fragment into
    the registers the first one's mma read, so every ldmatrix waits for the mma before it - the check that
    tells the two apart.  Larger grids keep no bounds (two blocks an SM)."""
    from apnumba.conv import _signature as conv_signature, conv_config
    from apnumba.tuning import SMS

    M, N, K = 1024, 256, 9 * 1024  # APNN-TC C = K = 1024, 16x16, 3x3
    cfg = conv_config(1, 2, M, N, K)
    assert cfg.blocks(M, N) <= SMS and cfg.min_blocks == 1 and not cfg.wgmma, cfg.short()
    assert conv_config(1, 2, 128, 256 * 28 * 28, 9 * 128, packed=True).min_blocks == 0
    bounded = sass.compile_kernel(apconv_kernel(1, 2, cfg, "i32"), conv_signature("i32"), (9, 0))
    plain = sass.compile_kernel(apconv_kernel(1, 2, dataclasses.replace(cfg, min_blocks=0), "i32").py_func,
                                conv_signature("i32"), (9, 0))
    check_clean(bounded, count=cfg.mma_per_step(1, 2))
    loads = _ldsm_destinations(bounded)
    assert len(loads) == cfg.steps * (cfg.mt + 2 * (cfg.nt // 2 + cfg.nt % 2)), loads  # w1a2: one A plane, two B
    assert max(loads.count(r) for r in loads) <= 2, loads  # a register serves two k-steps at most
    assert len(set(_ldsm_destinations(plain))) < len(set(loads)), _ldsm_destinations(plain)
    print(f"{cfg.short()}: {bounded.registers} registers with launch bounds ({len(set(loads))} ldmatrix destinations), "
          f"{plain.registers} without ({len(set(_ldsm_destinations(plain)))})")


def test_copy_plans_keep_their_shared_addresses():
    """The copy slots hold shared byte addresses (smem_addr, once in the prologue), so the k-loop's cp.async
    copies read their destination from a register.  Given an array index instead, ptxas rebuilt the shared
    window's base at every copy (S2UR SR_CgaCtaId, ULEA: ten reads in the APNN-TC C = K = 1024 conv kernel),
    each copy in a branch of its own (a slot test that is compile-time where every slot lies in the stage)."""
    from apnumba.conv import _signature as conv_signature, conv_config

    M, N, K = 1024, 256, 9 * 1024
    cfg = conv_config(1, 2, M, N, K)
    kernel = sass.compile_kernel(apconv_kernel(1, 2, cfg, "i32"), conv_signature("i32"), (9, 0))
    check_clean(kernel, count=cfg.mma_per_step(1, 2))
    windows = kernel.sass.count("SR_CgaCtaId")
    assert 1 <= windows <= 2, windows
    # Every copy of the k-tile is issued: A's two slots (whole and ragged k-tile paths) and B's two.
    assert kernel.sass.count("LDGSTS.E.BYPASS.128") == 6
