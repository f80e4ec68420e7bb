"""APMM: Y[m, n] = sum_k W[m, k] X[n, k] for p-bit W and q-bit X on binary tensor cores.

The emulation (``apnumba.reference`` derives it)::

    Y = sum_{j<p, i<q} cw_j cx_i popc(W_j AND X_i)  +  c_sw SW[m] + c_sx SX[n] + c_const

(SW, SX: row sums of the codes; the c_ terms are zero unless an encoding is
binary or a zero point is set - ``apnumba.reference.correction_terms``.)

Every plane pair is one b1 ``mma.sync m16n8k256 .and.popc`` per 256 bits of K.  Byte-packed
operands (``mma="s8.u8"`` etc.: one plane of int8 values each, for products such as an 8-bit
first layer where 64 plane pairs would cost more) take one int8 ``m16n8k32`` per 32 bytes
instead - the same k-step of 8 words, the same fragments, everything else unchanged.
One thread block computes every plane pair of its output tile in a single pass
over K (APNN-TC's bit-plane batching); plane products live in registers and are
combined there, in the epilogue, with the plane weights.

Tiles (``TileConfig``; m runs over W rows, n over X rows; "real" sizes, planes on top)::

                        BLOCK_N = warps_n * 8 * nt
                   +-----------+-----------+
                   | warp(0,0) | warp(0,1) |    each warp: mt x nt tiles of m16 x n8,
        BLOCK_M    +-----------+-----------+    for each of its (pg x q) plane pairs:
   = warps_m*16*mt | warp(1,0) | warp(1,1) |    pg*q*mt*nt accumulators of 4 int32 per lane
                   +-----------+-----------+

``warps_k`` > 1 splits K inside the block: warp group kg takes k-step kg of
every stage, and the groups' sums meet in the output tile.  ``split_k`` > 1
(convolutions) splits it over blocks instead - grid z, block z sums share z of
the k-tiles; the shares' tiles meet in a global workspace, and the last block of
a tile to finish (an atomic counter) adds them and runs the epilogue alone
(``split_k_reduce``).  It pays where a long K has too few output tiles for the SMs.

Shared memory, one stage (warps_k k-steps of 256 bits), ``stages`` deep (a cp.async ring)::

    for each k-step s < warps_k:
        A: [plane p < pg][row r < BLOCK_M][2 x 16-byte chunks]    then
        B: [plane i < q ][row r < BLOCK_N][2 x 16-byte chunks]
    chunk c of row r sits at position c ^ ((r >> 2) & 1): the 8 rows an ldmatrix
    phase reads then hit 8 distinct 4-bank groups (no bank conflicts).

Global memory: the packed layout (``words[plane, row, word]``, rows of kwords,
kwords a multiple of 8).  A 16-byte copy past the last row is zero-filled
(cp.async src-size 0), so ragged M and N need no padding; K is padded by the layout.

Per k-step a warp loads its fragments with ``ldmatrix`` (x4: one A m16 tile, or
two B n8 tiles) and issues pg*q*mt*nt independent mma.  ``plane_group`` (pg)
splits p weight planes into p/pg passes over K when all pairs at once would
need too many registers (w8a8): each pass folds its pairs into the output
accumulators before the next starts.

Warpgroup tiles (``TileConfig(wgmma=True)``, sm_90a; on an H100 the default for large products and
for convolutions with large grids - the conv kernel's gathered stages are the same rows)
replace the ldmatrix + mma.sync k-step by ``wgmma m64n(q*BN)k256``, one per weight plane of the pass,
read by the tensor cores straight from the stages::

    warpgroup w (warps 4w .. 4w+3): W rows 64w .. 64w+63 of plane j  x  all q planes of B (q*BN rows)
    stage rows of 32 / 64 / 128 bytes (1 / 2 / 4 k-steps) with the chunk swizzle above are the
    descriptor's K-major 32B / 64B / 128B swizzle atoms (8 rows); k-step s starts s * 32 bytes in

The copies are the same cp.async ring; a stage is refilled one iteration later (one wgmma group
stays in flight while the next is issued), and the accumulators land in the same fragment layout,
so the epilogue below is shared.

Epilogue, in two steps.  (1) In registers, each lane combines its plane pairs
with the weights cw_j * cx_i and writes the int32 sums into an output tile in
shared memory ([BLOCK_M][BLOCK_N + 8], over the drained stages).  (2) The
block walks that tile along the output's contiguous axis: binary-encoding
corrections (c_sw, c_sx, c_const), then int32, or float32 ``fadd_rn(fmul_rn(y, scale[m]), bias[m])``
(two roundings, as numpy does them, never an FMA), ragged edges masked.  Step
(2) is where fused epilogues (requantize, pack, ReLU, residual) plug in.

Persistent tiles (``TileConfig(persistent=True)``, APMM of one plane pass; on an H100 the default for
two-bit weights) launch as many blocks as fit at once; block b computes output tiles b, b + gridDim.x,
... (launch order, raster included), planning each tile's copies as it comes::

    tile t:  fill | k-loop .............. | sync | plan + fill tile t+1 | store t (from registers)
    tile t+1:                                      | k-loop (its first stages already landing) ...

A whole tile of a row-major output (rows of an even length, no column terms) is stored straight from
the accumulators (8-byte stores: lanes 4g .. 4g+3 write row g's 32-byte sector), so the stages are
free for the next tile's first k-tiles while it stores; any other tile takes the two steps above, then
the next tile's fill.
"""

import dataclasses
from dataclasses import dataclass
import functools

from numba import cuda, float32, int32, int64, uint32, uint64

from .pack import ENC_BINARY, ENC_SIGNED, code_range, encode_code, lane_group_sum, quantize_code, warp_sum
from .packed_ops import lane_code, store_word_at
from .ptx import (
    ld_global_cg_v4,
    sleep_ns,
    sm_count,
    SIMULATOR,
    cp_async_16,
    cp_async_4,
    cp_async_commit,
    cp_async_wait,
    DESC_SWIZZLE,
    divmod_magic,
    divmod_u32,
    fence_acq_rel_gpu,
    fence_proxy_async,
    magic_divisor,
    pin_registers,
    smem_addr,
    smem_desc,
    tuple_into,
    wgmma_b1,
    wgmma_commit,
    wgmma_fence,
    wgmma_wait,
    zeros_i32,
    f32_add_rn,
    f32_mul_rn,
    ld_shared,
    ld_shared_v4,
    ldmatrix_x2,
    ldmatrix_x4,
    mma_m16n8k256_and,
    mma_m16n8k32_int8,
    shfl_idx,
    st_global_cs_v2,
    st_global_cs_v4,
    st_global_v2,
    st_global_v4,
    st_shared,
    st_shared_v2,
)

K_STEP_WORDS = 8  # 256 bits: one m16n8k256 k-step
MAX_SUB_STEPS = 8  # k-steps of one warp per stage (stage_steps / warps_k), at most
MAX_THREADS = 512
MAX_SPLIT_K = 16
MAX_STRAIGHT_COPIES = 4  # copy slots a thread issues without a per-slot test (see _build)


@dataclass(frozen=True)
class TileConfig:
    """How a thread block tiles the output (sizes in real rows and columns, planes on top)."""

    warps_m: int = 2
    warps_n: int = 2
    mt: int = 4  # m16 tiles per warp
    nt: int = 8  # n8 tiles per warp
    stages: int = 4
    plane_group: int = 0  # weight planes per pass over K; 0 = all of them
    warps_k: int = 1  # warp groups splitting each stage's k-steps
    stage_steps: int = 0  # 256-bit k-steps per pipeline stage (a multiple of warps_k); 0 = warps_k
    raster: int = 0  # > 0: blocks run in groups of this many block-rows, column by column (L2 reuse)
    stream_out: bool = False  # store the output with evict-first (.cs) so it does not flush the operands from L2
    min_blocks: int = 0  # > 0: ask ptxas (launch bounds) to fit this many blocks per SM in the registers
    stagger_us: int = 0  # > 0: the first wave's odd blocks start this late (SMs' epilogues then fall apart)
    # Warpgroup products (sm_90a wgmma, operands read from the stages): each 4 warps along m are one
    # warpgroup of 64 rows with mt = 1, warps_n = 1 and nt * 8 = block_n columns; per k-step a
    # warpgroup issues one m64n(q * block_n)k256 per weight plane of the pass.
    wgmma: bool = False
    # APMM tiles of one pass and one k-group: one block per SM slot walks the output tiles (launch order, every
    # gridDim.x-th), issuing the next tile's first stages before it stores this one straight from the accumulators.
    persistent: bool = False
    # > 1 (convolutions): blocks splitting K (grid z) - each sums a share of the k-tiles, the last of a tile to
    # finish adds the others' partial tiles (left in a global workspace) and runs the epilogue alone.
    split_k: int = 1

    def __post_init__(self):
        for name in ("warps_m", "warps_n", "mt", "nt", "warps_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.steps % self.warps_k:
            raise ValueError(f"stage_steps: expected a multiple of warps_k={self.warps_k}, got {self.stage_steps}")
        if self.steps // self.warps_k > MAX_SUB_STEPS:
            raise ValueError(f"stage_steps: at most {MAX_SUB_STEPS} k-steps per warp group, got {self.steps // self.warps_k}")
        if self.stages < 2:
            raise ValueError(f"stages: expected >= 2, got {self.stages}")
        if self.min_blocks < 0:
            raise ValueError(f"min_blocks: expected >= 0, got {self.min_blocks}")
        if self.raster < 0:
            raise ValueError(f"raster: expected >= 0, got {self.raster}")
        if not 1 <= self.split_k <= MAX_SPLIT_K:
            raise ValueError(f"split_k: expected 1 to {MAX_SPLIT_K}, got {self.split_k}")
        if not 0 <= self.stagger_us <= 1000:
            raise ValueError(f"stagger_us: expected 0 to 1000, got {self.stagger_us}")
        if self.threads > MAX_THREADS:
            raise ValueError(f"warps: {self.threads} threads per block, at most {MAX_THREADS}")
        if self.wgmma:
            shape = (self.warps_m % 4, self.warps_n, self.mt, self.warps_k)
            if shape != (0, 1, 1, 1) or self.steps not in (1, 2, 4) or self.stages < 3:
                raise ValueError("wgmma: expected warps_m a multiple of 4, warps_n = mt = warps_k = 1, stage_steps "
                                 f"1, 2 or 4 and stages >= 3, got {self}")

    @property
    def block_m(self):
        return self.warps_m * 16 * self.mt

    @property
    def block_n(self):
        return self.warps_n * 8 * self.nt

    @property
    def threads(self):
        return 32 * self.warps_m * self.warps_n * self.warps_k

    @property
    def steps(self):
        """k-steps per stage."""
        return self.stage_steps or self.warps_k

    def grid(self, M, N):
        """The output tiles of an M x N output: (column blocks, row blocks)."""
        return -(-N // self.block_n), -(-M // self.block_m)

    def launch_grid(self, M, N):
        """The launch grid: the output tiles, times ``split_k`` along z."""
        return (*self.grid(M, N), self.split_k)

    def split_words(self, M, N):
        """int32 words of the split-K workspace: every block's partial output tile (0 without a split)."""
        return self.blocks(M, N) * self.split_k * self.block_m * self.block_n if self.split_k > 1 else 0

    def blocks(self, M, N):
        """Thread blocks of an M x N output."""
        gx, gy = self.grid(M, N)
        return gx * gy

    def group(self, p):
        g = self.plane_group or p
        if p % g:
            raise ValueError(f"plane_group: {g} does not divide {p} weight planes")
        return g

    def passes(self, p):
        return p // self.group(p)

    def stage_words(self, p, q):
        return self.steps * (self.group(p) * self.block_m + q * self.block_n) * K_STEP_WORDS

    def shared_bytes(self, p, q, conv=False):
        """Dynamic shared memory: the stages, and the int32 output tile (over them when there is one pass);
        convolutions store the tile transposed and keep four words per output pixel after it."""
        stages = self.stages * self.stage_words(p, q)
        tile = self.block_n * (self.block_m + 4) + 4 * self.block_n if conv else self.block_m * (self.block_n + 8)
        align = 256 if self.wgmma else 0  # wgmma's swizzle atoms need the stages 1024-byte aligned
        return 4 * ((max(stages, tile) if self.passes(p) == 1 else stages + tile) + align)

    def mma_per_step(self, p, q):
        """Independent mma a warp issues per 256-bit k-step (its accumulators: 4 registers each)."""
        return self.group(p) * q * self.mt * self.nt

    def short(self):
        extra = (f"g{self.plane_group}" if self.plane_group else "") + (f"k{self.warps_k}" if self.warps_k > 1 else "")
        extra += f"x{self.steps}" if self.steps != self.warps_k else ""
        extra += (f"r{self.raster}" if self.raster else "") + ("c" if self.stream_out else "")
        extra += f"b{self.min_blocks}" if self.min_blocks else ""
        extra += f"d{self.stagger_us}" if self.stagger_us else ""
        extra += "W" if self.wgmma else ""
        extra += "P" if self.persistent else ""
        extra += f"z{self.split_k}" if self.split_k > 1 else ""
        return f"{self.warps_m}x{self.warps_n}w{self.mt}x{self.nt}t{self.stages}s{extra}"


MMA_KINDS = ("b1", "s8.s8", "s8.u8", "u8.s8", "u8.u8")
# The n of a b1 wgmma m64nNk256 (PTX ISA, integer and b1 types; ptxas rejects 40, 56, ..., 248).
WGMMA_N = (8, 16, 24, *range(32, 257, 16))


# apconv's geometry array: the sizes, then (divisor, magic, shift) of each launch-constant divisor
# (divmod_magic): an output row's pixels, an output row, the filter's width, a tap's words.
GEO_PIXELS, GEO_ROW, GEO_S, GEO_TAP = 11, 14, 17, 20


def conv_geometry(H, W, cwords, R, S, stride, padding, OH, OW, C, tap_words, pooled=False):
    """apconv's ``geometry`` (int32 values).  With a fused 2x2 pooling the GEMM rows run window by
    window, so the pixel divisors are those of the pooled image."""
    pixels, row = ((OH >> 1) * (OW >> 1), OW >> 1) if pooled else (OH * OW, OW)
    values = [H, W, cwords, R, S, stride, padding, OH, OW, C, tap_words]
    for d in (pixels, row, S, tap_words):
        values += [d, *magic_divisor(d)]
    return tuple(int(v) for v in values)


def _check_mma(mma, p, q, config):
    if mma not in MMA_KINDS:
        raise ValueError(f"mma: expected one of {MMA_KINDS}, got {mma!r}")
    if mma != "b1" and (p, q) != (1, 1):
        raise ValueError(f"mma: int8 operands are one plane of bytes each (p = q = 1), got p={p}, q={q}")
    if config.wgmma:
        regs = config.group(p) * q * config.block_n
        if mma != "b1" or q * config.block_n not in WGMMA_N or regs > 256 or config.group(p) > 2:
            raise ValueError(f"config: wgmma takes b1 planes, q * block_n columns a product in {WGMMA_N} and at most two "
                             f"weight planes a pass of <= 256 columns in all, got p={p}, q={q}, mma={mma!r}, {config.short()}")


@functools.lru_cache(maxsize=None)
def apmm_kernel(p, q, config, out_float, mma="b1"):
    """The APMM kernel specialised for p weight planes, q activation planes, a TileConfig and the output type.

    ``mma``: "b1" (bit planes, AND + popc), or the int8 operand types ("s8.u8": W signed, X unsigned)
    of byte-packed operands (one plane each: p = q = 1).
    Launch: grid (ceil(N / block_n), ceil(M / block_m)) - with ``config.persistent``, (any number of
    blocks, 1): block b computes tiles b, b + gridDim.x, ... of that grid's launch order - block
    (config.threads,), dynamic shared memory config.shared_bytes(p, q).
    """
    _check_mma(mma, p, q, config)
    if config.split_k > 1:
        raise ValueError(f"config: split_k is for convolutions (APMM tiles sum all of K), got {config.short()}")
    if config.persistent and (config.passes(p) > 1 or config.warps_k > 1):
        raise ValueError(f"config: persistent tiles store straight from the accumulators: one plane pass and warps_k = 1, "
                         f"got {config.short()} for p={p}")
    return _build(p, q, config, out_float, conv=False, mma=mma)


OUT_KINDS = ("i32", "f32", "pack", "pack_max", "pack_avg")


def apconv_kernel(p, q, config, out, mma="b1", epilogue=None, word_taps=False):
    """The APConv kernel: the same pipeline with B gathered from NHWC activations (an implicit GEMM).

    M = output channels, N = output pixels (n, oh, ow), K = R * S taps x ``reference.conv_tap_words(C)``
    words (for at most 128 channels of bit planes, two taps a k-step), padded to whole k-steps.
    ``word_taps``: the taps are one word each (channels that fit a word: an image's bytes), so a
    16-byte chunk of K holds four taps, each from its own input pixel - four 4-byte copies.
    out: "i32", "f32" (scale, bias), or "pack" (the fused epilogue: affine, residual, ReLU,
    requantize and pack the next layer's NHWC input; block_m must be a multiple of 32), or
    "pack_max" / "pack_avg": the same with a 2x2 stride-2 pooling before the requantize (no residual).
    With pooling, GEMM row n is pixel (2 ph + (n & 2) / 2, 2 pw + (n & 1)) of pooled pixel n / 4, so
    each pooling window is 4 consecutive rows of one tile (floor mode: an odd last row/column is dropped).
    ``mma`` as for :func:`apmm_kernel`.  ``epilogue``, for the packed outputs: the compile-time
    (out_bits, out_encoding, res_bits, res_encoding, whole_rows[, levels[, bytes_out]]) - the precisions'
    plane loops unroll (res_bits 0: no residual), with ``whole_rows`` (the block holds every output channel:
    M <= block_m) a pixel's code sum is stored, not added atomically to a zeroed row sum; ``levels`` > 0:
    integer thresholds instead of the float32 requantize; ``bytes_out``: code bytes instead of bit planes.
    Launch: grid config.launch_grid(M, N) - (ceil(N / block_n), ceil(M / block_m), split_k) - block
    (config.threads,), dynamic shared memory config.shared_bytes(p, q, conv=True); with split_k > 1 the
    split's workspace (config.split_words(M, N) int32) and tile counters (zeroed once) - ``split_k_reduce``.
    """
    _check_mma(mma, p, q, config)
    if out not in OUT_KINDS:
        raise ValueError(f"out: expected one of {OUT_KINDS}, got {out!r}")
    if config.stagger_us or config.persistent:
        raise ValueError(f"config: stagger_us and persistent are for APMM tiles, convolutions start every block at once, "
                         f"got {config.short()}")
    if config.split_k > 2:  # (the kernel reads its share count from the grid: one build serves every split)
        config = dataclasses.replace(config, split_k=2)
    return _apconv_kernel(p, q, config, out, mma, epilogue, bool(word_taps))


@functools.lru_cache(maxsize=None)
def _apconv_kernel(p, q, config, out, mma, epilogue, word_taps):
    if out.startswith("pack") and config.block_m % 32:
        raise ValueError(f"config: packing the output needs block_m a multiple of 32, got {config.block_m}")
    if out.startswith("pack") and (epilogue is None or len(epilogue) not in (5, 6, 7)):
        raise ValueError("epilogue: a packed output needs (out_bits, out_encoding, res_bits, res_encoding, whole_rows"
                         f"[, threshold levels[, bytes out]]), got {epilogue!r}")
    if len(epilogue or ()) > 5 and epilogue[5] and (epilogue[2] or out != "pack"):
        raise ValueError(f"epilogue: thresholds replace the float epilogue only without a residual or pooling, got {epilogue!r}")
    return _build(p, q, config, out, conv=True, mma=mma, epilogue=epilogue, word_taps=word_taps)


def _build(p, q, config, out, conv, mma, epilogue=None, word_taps=False):
    PG = config.group(p)
    PASSES = config.passes(p)
    Q = q
    WM, WN, WK = config.warps_m, config.warps_n, config.warps_k
    MT, NT, STAGES = config.mt, config.nt, config.stages
    BM, BN, THREADS = config.block_m, config.block_n, config.threads
    A_ROWS, B_ROWS = PG * BM, Q * BN  # rows of a stage (planes stacked)
    STEPS = config.steps  # k-steps per stage; warp group kg takes steps kg, kg + WK, ...
    SUB_STEPS = STEPS // WK  # a warp's k-steps per stage
    CHUNKS = 2 * STEPS  # 16-byte chunks per row per stage
    ROW_WORDS = K_STEP_WORDS * STEPS
    STAGE_WORDS = (A_ROWS + B_ROWS) * ROW_WORDS
    # XOR swizzle of the chunks of a row: the 8 rows an ldmatrix phase reads land in 8 distinct
    # 16-byte bank groups, and the chunks of one row (a 16-byte copy each) stay inside that row.
    SW_SHIFT, SW_MASK = {2: (2, 1), 4: (1, 3)}.get(CHUNKS, (0, 7))
    A_COPIES = -(-A_ROWS * CHUNKS // THREADS)  # 16-byte copies per thread per stage
    B_COPIES = -(-B_ROWS * CHUNKS // THREADS)
    # Every thread's every copy slot lies in the stage (compile-time: no per-copy test in the k-loop) - for
    # up to MAX_STRAIGHT_COPIES slots: one-warp tiles copy 16 chunks a thread, and without the tests ptxas
    # computes all their addresses at once (w2a2 1x1w2x1t4sx4: 230 -> 255 registers and spills).
    A_WHOLE = A_COPIES * THREADS == A_ROWS * CHUNKS and A_COPIES <= MAX_STRAIGHT_COPIES
    B_WHOLE = B_COPIES * THREADS == B_ROWS * CHUNKS and B_COPIES <= MAX_STRAIGHT_COPIES
    NT_PAIRS, NT_ODD = NT // 2, NT % 2
    # Convolutions: B copy slots c and c + PIXEL_SLOTS read one output pixel (of the next plane) where a
    # plane's BN rows are whole slots of THREADS // CHUNKS rows - the pixel's divisions are done once.
    PIXEL_SLOTS = BN // (THREADS // CHUNKS) if BN % (THREADS // CHUNKS) == 0 else B_COPIES
    # The int32 output tile: [m][n] with rows of BN + 8 (64-bit fragment stores conflict-free), or for
    # convolutions, whose output is NHWC, transposed [n][m] with rows of BM + 4 (scalar fragment stores
    # and 16-byte reads along m conflict-free).  Convolutions keep per-pixel data after it (COLUMNS).
    TILE_NM = conv
    TILE_LD = BM + 4 if TILE_NM else BN + 8
    TILE_BASE = 0 if PASSES == 1 else STAGES * STAGE_WORDS
    COL_BASE = TILE_BASE + (BN * TILE_LD if TILE_NM else BM * TILE_LD)
    COLUMNS = 4 if conv else 0  # valid taps x C, sum of the taps' pixel sums, ih0, iw0
    SUMS_IN_TILE = PASSES > 1 or WK > 1  # several partial sums meet in the tile
    OUT_FLOAT = out is True or out == "f32"
    OUT_PACK = out in ("pack", "pack_max", "pack_avg")
    POOL = {"pack_max": 1, "pack_avg": 2}.get(out, 0) if isinstance(out, str) else 0  # 2x2/2 pooling
    OUT_DTYPE = float32 if OUT_FLOAT else int32
    WORDS_PER_COLUMN = BM // 32  # packed output: words of 32 channels per output pixel in the tile
    OUT_BITS, OUT_ENC, RES_BITS, RES_ENC, WHOLE_ROWS = (epilogue or (1, 0, 0, 0, False))[:5]
    # > 0: the requantize as that many integer comparisons per channel (reference.requantize_thresholds)
    LEVELS = epilogue[5] if epilogue is not None and len(epilogue) > 5 else 0
    # The output as code bytes (an int8 next layer: 8 words per 32 channels) instead of bit planes.
    OUT_BYTES = bool(epilogue[6]) if epilogue is not None and len(epilogue) > 6 else False
    LEVEL_STEP = 2 if OUT_ENC == ENC_BINARY else 1
    LEVEL_COLS = LEVELS + 1  # a channel's sign and thresholds
    # Bit planes from thresholds: each plane's bit as predicates of the comparisons (level_pattern), where the
    # thresholds span the whole code range (2^b - 1 levels; one for +-1 codes).  ptxas fuses the XORs into
    # ISETP.XOR chains and ballots the predicates: ~15 instructions a word instead of ~26 (H100, ResNet-18's
    # 3x3 layers at batch 256 with the u2 epilogue, with this session's other epilogue changes: w1a2 9-18%,
    # w2a2 4-15% less time).
    SIGNED_OUT = OUT_ENC == ENC_SIGNED
    LEVEL_PATTERNS = LEVELS > 0 and not OUT_BYTES and LEVELS == (1 if OUT_ENC == ENC_BINARY else (1 << OUT_BITS) - 1)
    RES_ARRAY_PLANES = max(RES_BITS, 1)  # (a local array needs a size even without a residual)
    RASTER, STREAM_OUT = config.raster, config.stream_out
    SPLIT = config.split_k > 1
    # The output tile as rows of 4-word groups (the split-K reduction walks it 16 bytes at a time).
    TILE_ROWS, TILE_COLS4 = (BN, BM // 4) if TILE_NM else (BM, BN // 4)
    SPLIT_GROUPS = TILE_ROWS * TILE_COLS4
    SPLIT_PER_THREAD = -(-SPLIT_GROUPS // THREADS)
    SPLIT_CHUNK = min(SPLIT_PER_THREAD, 8)
    SPLIT_PER_THREAD = -(-SPLIT_PER_THREAD // SPLIT_CHUNK) * SPLIT_CHUNK
    SPLIT_WHOLE = SPLIT_GROUPS == SPLIT_PER_THREAD * THREADS  # every thread's every group is in the tile
    STAGGER_NS = 1000 * config.stagger_us
    PERSISTENT = config.persistent
    WORD_TAPS = word_taps  # a tap is one word: a chunk of K is four taps (conv only)
    COLS4 = BN // 4  # 4-column groups of the output tile
    # Lanes that share an output pixel's column terms (conv, windows of more than one tap): its valid
    # taps' pixel sums split over them, so a 3x3 window's nine dependent loads become ceil(9 / TAP_LANES)
    # (the whole block waits on that gather; H100, C = K = 1024 at 16x16: 9.4 -> 9.1 us).
    TAP_LANES = 1 << (max(1, min(32, THREADS // BN)).bit_length() - 1)  # (a power of two: BN and THREADS are)
    TAP_SHIFT = TAP_LANES.bit_length() - 1
    # Gather the column terms inside the main loop (each thread has at most one slot of them; see apconv):
    # on wgmma tiles of one weight plane a pass, where the registers it holds through the loop cost no
    # block per SM (H100: w1a2 96 -> 124 registers, two 256-thread blocks either way; two planes a pass
    # would go 168 -> 200, three 128-thread blocks -> two; mma.sync tiles 70 -> 122).
    COLUMN_SLOT = config.wgmma and PG == 1 and BN * TAP_LANES <= THREADS
    tap_lanes_sum = lane_group_sum(TAP_LANES)
    FIXED_COLUMNS = THREADS % COLS4 == 0  # every thread keeps the same column group in the epilogue
    # One product per plane pair and k-step: b1 AND + popc over 256 bits, or int8 over 32 bytes
    # (the same fragments, so everything else is shared).
    mma_tile = mma_m16n8k256_and if mma == "b1" else mma_m16n8k32_int8(mma)
    WGMMA = config.wgmma
    # k-tiles loaded ahead: with wgmma the groups of k-tile kt - 1 may still read their stage while
    # k-tile kt is issued (one group in flight), so that stage is refilled one iteration later.
    AHEAD = STAGES - 2 if WGMMA else STAGES - 1
    wait_for_stage = cp_async_wait(AHEAD - 1)
    wait_all = cp_async_wait(0)
    ALIGN_WORDS = 256 if WGMMA else 0
    assert config.shared_bytes(p, q, conv) == 4 * (max(STAGES * STAGE_WORDS, COL_BASE + COLUMNS * BN) + ALIGN_WORDS)
    if WGMMA:
        WG_N = Q * BN  # a warpgroup's product: 64 rows x (q planes x BN) columns per weight plane
        WG_REGS = WG_N // 2
        wg_mma = wgmma_b1(WG_N)
        wg_zeros = zeros_i32(WG_REGS)
        wg_pin = pin_registers(WG_REGS)
        wg_wait_one = wgmma_wait(1)
        wg_wait_all = wgmma_wait(0)
        SWIZZLE, ATOM_STRIDE = DESC_SWIZZLE[ROW_WORDS * 4]  # the stages' rows are the descriptor's swizzle atoms
        DESC_FIELDS = uint64((1 << 16) | ((ATOM_STRIDE >> 4) << 32) | (SWIZZLE << 62))

    @cuda.jit(device=True, inline="always")
    def finish(v, row_term, c_sx, sum_x, n, scale, bias, m):
        """One output element from its combined plane sum: corrections, then int32 or float32."""
        v = int32(v) + int32(row_term)
        if c_sx != 0:
            v += c_sx * sum_x[n]
        if OUT_FLOAT:
            return f32_add_rn(f32_mul_rn(float32(v), scale[m]), bias[m])
        return v

    @cuda.jit(device=True, inline="always")
    def swizzle(row, chunk):
        """Word offset of 16-byte chunk ``chunk`` of stage row ``row`` (bank-conflict-free for ldmatrix)."""
        return row * ROW_WORDS + ((chunk ^ ((row >> SW_SHIFT) & SW_MASK)) << 2)

    @cuda.jit(device=True, inline="always")
    def plan_copies(copy, rows_per_plane, rows, row0, kwords, dst_base):
        """Copy number ``copy`` of a stage: (src word offset, dst word offset in stage 0, k-step, bytes).

        Consecutive copies walk along one row's k first, so a warp reads whole 128-byte lines."""
        chunk = copy % CHUNKS
        prow = copy // CHUNKS  # plane * rows_per_plane + row
        plane = prow // rows_per_plane
        row = prow - plane * rows_per_plane
        src = (int64(plane) * rows + min(row0 + row, rows - 1)) * kwords + chunk * 4
        return src, dst_base + swizzle(prow, chunk), chunk >> 1, (16 if row0 + row < rows else 0)

    @cuda.jit(device=True, inline="always")
    def plan_operand(smem, tid, rows_per_plane, rows, row0, kwords, dst_base, stage_rows, src, dst, step, nbytes):
        """This thread's copy slots of one operand (see plan_copies), dst as shared byte addresses in stage 0;
        slots past the stage's rows get dst -1 (a shared address is below 2^24 plus the block's rank in its
        cluster times 2^24: never negative)."""
        for c in range(src.shape[0]):
            copy = c * THREADS + tid
            src[c], at, step[c], nbytes[c] = plan_copies(copy, rows_per_plane, rows, row0, kwords, dst_base)
            dst[c] = int32(smem_addr(smem, at)) if copy < stage_rows * CHUNKS else -1

    @cuda.jit(device=True, inline="always")
    def zero_accumulators(acc):
        for j in range(PG):
            for i in range(Q):
                for mt in range(MT):
                    for nt in range(NT):
                        for e in range(4):
                            acc[j, i, mt, nt, e] = 0

    def copier(COPIES, WHOLE):
        @cuda.jit(device=True, inline="always")
        def copy_rows(smem, base, step0, k_steps, words, offset, src, dst, step, nbytes):
            """Issue this thread's cp.async copies of the k-tile starting at k-step ``step0`` into the stage
            at word ``base`` (dst: the slots' byte addresses in stage 0)."""
            base_bytes = int32(base << 2)
            if step0 + STEPS <= k_steps:  # a whole k-tile (all but a ragged last one): no per-copy k test
                for c in range(COPIES):
                    if WHOLE or dst[c] >= 0:
                        cp_async_16(smem, int32(dst[c] + base_bytes), words, offset + src[c] + step0 * K_STEP_WORDS,
                                    nbytes[c])
            else:
                for c in range(COPIES):
                    if WHOLE or dst[c] >= 0:
                        live = step0 + step[c] < k_steps
                        at = offset + src[c] + step0 * K_STEP_WORDS if live else int64(0)
                        cp_async_16(smem, int32(dst[c] + base_bytes), words, at, nbytes[c] if live else 0)

        return copy_rows

    copy_a, copy_b = copier(A_COPIES, A_WHOLE), copier(B_COPIES, B_WHOLE)

    @cuda.jit(device=True, inline="always")
    def load_stage(smem, stage, kt, k_steps, a_words, b_words, a_pass,
                   a_src, a_dst, a_step, a_bytes, b_src, b_dst, b_step, b_bytes):
        """Issue this thread's cp.async copies of k-tile ``kt`` (STEPS k-steps) into ``stage``."""
        base = stage * STAGE_WORDS
        copy_a(smem, base, kt * STEPS, k_steps, a_words, a_pass, a_src, a_dst, a_step, a_bytes)
        copy_b(smem, base, kt * STEPS, k_steps, b_words, int64(0), b_src, b_dst, b_step, b_bytes)

    @cuda.jit(device=True, inline="always")
    def lane_row(row, lane_bit):
        """A lane's ldmatrix row: its word offset and the chunk bits its swizzle flips (with the lane's
        half-row bit), so the address of k-step s is one XOR and one add: ``row_at + ((2s ^ flip) << 2)``."""
        return row * ROW_WORDS, lane_bit ^ ((row >> SW_SHIFT) & SW_MASK)

    @cuda.jit(device=True, inline="always")
    def ldmatrix_lanes(warp_m, warp_n, lane):
        """The rows whose ldmatrix addresses this lane gives - A (plane 0, m-tile 0), a B pair (plane 0,
        n-tiles 0 and 1), the odd B tile - as (offset, swizzle flip) pairs; the half-row bit is the
        lane's 16-byte chunk within the k-step (lanes 16-31 for A, lanes 8-15 and 24-31 for B)."""
        a_at, a_flip = lane_row(warp_m * 16 * MT + (lane & 7) + 8 * ((lane >> 3) & 1), lane >> 4)
        b_at, b_flip = lane_row(A_ROWS + warp_n * 8 * NT + (lane & 7) + 8 * (lane >> 4), (lane >> 3) & 1)
        b_odd_at, b_odd_flip = lane_row(A_ROWS + warp_n * 8 * NT + (NT - 1) * 8 + (lane & 7), (lane >> 3) & 1)
        return a_at, a_flip, b_at, b_flip, b_odd_at, b_odd_flip

    @cuda.jit(device=True, inline="always")
    def compute_step(smem, base, step, a_at, a_flip, b_at, b_flip, b_odd_at, b_odd_flip, acc, a_frag, b_frag):
        """One k-step of this warp: fragments by ldmatrix, then every plane pair's mma."""
        a_lane = base + a_at + (((2 * step) ^ a_flip) << 2)
        b_lane = base + b_at + (((2 * step) ^ b_flip) << 2)
        b_lane_odd = base + b_odd_at + (((2 * step) ^ b_odd_flip) << 2)
        for j in range(PG):
            for mt in range(MT):
                f = ldmatrix_x4(smem, a_lane + (j * BM + mt * 16) * ROW_WORDS)
                a_frag[j, mt, 0] = f[0]
                a_frag[j, mt, 1] = f[1]
                a_frag[j, mt, 2] = f[2]
                a_frag[j, mt, 3] = f[3]
        for i in range(Q):
            for pair in range(NT_PAIRS):
                f = ldmatrix_x4(smem, b_lane + (i * BN + pair * 16) * ROW_WORDS)
                b_frag[i, 2 * pair, 0] = f[0]
                b_frag[i, 2 * pair, 1] = f[1]
                b_frag[i, 2 * pair + 1, 0] = f[2]
                b_frag[i, 2 * pair + 1, 1] = f[3]
            if NT_ODD:
                h = ldmatrix_x2(smem, b_lane_odd + i * BN * ROW_WORDS)
                b_frag[i, NT - 1, 0] = h[0]
                b_frag[i, NT - 1, 1] = h[1]
        for j in range(PG):
            for i in range(Q):
                for mt in range(MT):
                    for nt in range(NT):
                        d = mma_tile(
                            a_frag[j, mt, 0], a_frag[j, mt, 1], a_frag[j, mt, 2], a_frag[j, mt, 3],
                            b_frag[i, nt, 0], b_frag[i, nt, 1],
                            acc[j, i, mt, nt, 0], acc[j, i, mt, nt, 1],
                            acc[j, i, mt, nt, 2], acc[j, i, mt, nt, 3],
                        )
                        acc[j, i, mt, nt, 0] = d[0]
                        acc[j, i, mt, nt, 1] = d[1]
                        acc[j, i, mt, nt, 2] = d[2]
                        acc[j, i, mt, nt, 3] = d[3]

    @cuda.jit(device=True, inline="always")
    def compute_stage(smem, base, warp_k, lanes, acc, a_frag, b_frag):
        """This warp's k-steps of the stage at ``base`` (k-steps warp_k, warp_k + WK, ...), unrolled: the
        step numbers are constants, so each k-step costs its ldmatrix, its mma and three address ops."""
        a_at, a_flip, b_at, b_flip, b_odd_at, b_odd_flip = lanes
        k0 = 0 if WK == 1 else warp_k  # with one k-group the step numbers are compile-time constants
        # Written out, not a loop: a loop's int64 counter and its branch cost as much as the addresses.
        compute_step(smem, base, k0, a_at, a_flip, b_at, b_flip, b_odd_at, b_odd_flip, acc, a_frag, b_frag)
        if SUB_STEPS > 1:
            compute_step(smem, base, k0 + WK, a_at, a_flip, b_at, b_flip, b_odd_at, b_odd_flip, acc, a_frag, b_frag)
        if SUB_STEPS > 2:
            compute_step(smem, base, k0 + 2 * WK, a_at, a_flip, b_at, b_flip, b_odd_at, b_odd_flip, acc, a_frag, b_frag)
            compute_step(smem, base, k0 + 3 * WK, a_at, a_flip, b_at, b_flip, b_odd_at, b_odd_flip, acc, a_frag, b_frag)
        if SUB_STEPS > 4:
            for sub in range(4, SUB_STEPS):  # 8 k-steps a stage: a loop again (code size)
                compute_step(smem, base, k0 + sub * WK, a_at, a_flip, b_at, b_flip, b_odd_at, b_odd_flip,
                             acc, a_frag, b_frag)

    @cuda.jit(device=True, inline="always")
    def stages_memory():
        """The block's dynamic shared memory; with wgmma from its first 1024-byte boundary on (the hardware
        applies the descriptors' swizzle to address bits: config.shared_bytes counts the 1 KB spare)."""
        smem = cuda.shared.array(0, uint32)
        if WGMMA:
            smem = smem[((1024 - (smem_addr(smem, 0) & 1023)) & 1023) >> 2:]
        return smem

    @cuda.jit(device=True, inline="always")
    def wgmma_start(warp):
        """Warpgroup w (warps 4w .. 4w + 3) multiplies rows 64w .. 64w + 63 of every weight plane of the pass
        by all q activation planes at once (B's planes are consecutive rows): its rows' word offset in a
        stage, and zeroed accumulators for the pass's (at most two) weight planes."""
        return (warp >> 2) * 64 * ROW_WORDS, wg_zeros(), wg_zeros()

    @cuda.jit(device=True, inline="always")
    def wgmma_stage(smem, base, wg_rows, acc0, acc1):
        """A warpgroup's k-steps of the stage at ``base``, issued as one wgmma group: per k-step one
        m64n(q * BN)k256 per weight plane of the pass (B's q planes are consecutive rows: one product).
        Then wait for the previous stage's group (that stage may be refilled from the next iteration on)."""
        wgmma_fence()
        for step in range(STEPS):  # k-step s of a row starts s * 32 bytes in (the swizzle is the hardware's)
            db = smem_desc(smem, base + A_ROWS * ROW_WORDS + step * K_STEP_WORDS, DESC_FIELDS)
            acc0 = wg_mma(acc0, smem_desc(smem, base + wg_rows + step * K_STEP_WORDS, DESC_FIELDS), db, 1)
            if PG > 1:
                acc1 = wg_mma(acc1, smem_desc(smem, base + BM * ROW_WORDS + wg_rows + step * K_STEP_WORDS, DESC_FIELDS),
                              db, 1)
        wgmma_commit()
        wg_wait_one()
        return acc0, acc1

    @cuda.jit(device=True, inline="always")
    def wgmma_drain(acc, acc0, acc1):
        """Wait for the last group and move the warpgroup accumulators into ``acc``.  The warpgroup fragment
        is the m16n8 tiles the fold walks: n8 column group c of plane i's columns is register group
        i * NT + c, so acc[j, i, 0, c, e] is register 4 (i NT + c) + e of plane j."""
        wg_wait_all()
        acc0 = wg_pin(acc0)
        if PG > 1:
            acc1 = wg_pin(acc1)
        tuple_into(acc, 0, acc0)
        if PG > 1:
            tuple_into(acc, WG_REGS, acc1)

    @cuda.jit(device=True, inline="always")
    def fold_into_tile(smem, ps, acc, pair_coef, coef_w, coef_x, warp_m, warp_n, warp_k, lane):
        """Epilogue step 1: plane pairs weighted cw_j * cx_i -> the int32 output tile in shared memory.

        With one pass the tile lies over the stages, so wait until every warp is done with them."""
        g = lane >> 2
        t = lane & 3
        wait_all()
        cuda.syncthreads()
        for j in range(PG):
            for i in range(Q):
                pair_coef[j, i] = coef_w[ps * PG + j] * coef_x[i]
        for kg in range(WK):  # k-groups add their partial sums one after another
            if warp_k == kg and TILE_NM:
                for mt in range(MT):
                    for nt in range(NT):
                        for e in range(4):  # element (m, n) of the fragment -> tile[n][m]
                            m = warp_m * 16 * MT + mt * 16 + g + 8 * (e >> 1)
                            n = warp_n * 8 * NT + nt * 8 + 2 * t + (e & 1)
                            v = int32(0)
                            for j in range(PG):
                                for i in range(Q):
                                    v += pair_coef[j, i] * acc[j, i, mt, nt, e]
                            if SUMS_IN_TILE and (ps != 0 or kg != 0):
                                v += int32(ld_shared(smem, TILE_BASE + n * TILE_LD + m))
                            st_shared(smem, TILE_BASE + n * TILE_LD + m, v)
            elif warp_k == kg:
                for mt in range(MT):
                    for nt in range(NT):
                        at = TILE_BASE + (warp_m * 16 * MT + mt * 16 + g) * TILE_LD + warp_n * 8 * NT + nt * 8 + 2 * t
                        for half in range(2):  # rows g and g + 8 of the m16n8 tile
                            v0 = int32(0)
                            v1 = int32(0)
                            for j in range(PG):
                                for i in range(Q):
                                    v0 += pair_coef[j, i] * acc[j, i, mt, nt, 2 * half]
                                    v1 += pair_coef[j, i] * acc[j, i, mt, nt, 2 * half + 1]
                            if SUMS_IN_TILE and (ps != 0 or kg != 0):
                                v0 += int32(ld_shared(smem, at + half * 8 * TILE_LD))
                                v1 += int32(ld_shared(smem, at + half * 8 * TILE_LD + 1))
                            st_shared_v2(smem, at + half * 8 * TILE_LD, v0, v1)
            if WK > 1:
                cuda.syncthreads()
        cuda.syncthreads()

    @cuda.jit(device=True, inline="always")
    def tile_group(i):
        """Word offset of 4-word group i of the int32 output tile (row by row)."""
        r, c4 = divmod_u32(i, TILE_COLS4)
        return TILE_BASE + r * TILE_LD + 4 * c4

    @cuda.jit(device=True, inline="always")
    def split_k_range(k_tiles):
        """This block's k-tiles when gridDim.z blocks split K: (first, count) - equal shares, the last
        one shorter (the host picks splits that leave none empty; an empty one would add zeros)."""
        share, _ = divmod_u32(k_tiles + cuda.gridDim.z - 1, cuda.gridDim.z)  # (32-bit: no division routine)
        first = int32(cuda.blockIdx.z * share)
        return first, int32(max(min(share, k_tiles - first), 0))

    @cuda.jit(device=True, inline="always")
    def split_group(tid, j):
        """This thread's group j in the last block's reduction (groups tid, tid + THREADS, ...), and whether
        the tile has it."""
        i = tid + j * THREADS
        return i, SPLIT_WHOLE or i < SPLIT_GROUPS

    @cuda.jit(device=True, inline="always")
    def split_k_reduce(smem, split_ws, split_count, tid):
        """Split K's meeting point, after the fold (the block's partial int32 tile in shared memory).

        Every block stores its partial tile to its slot of the workspace, then counts itself in at the
        tile's counter; the last to arrive (``atom.inc`` wraps the counter back to 0 for the next launch)
        adds the other slots into its own tile and returns True - it runs the epilogue; the others
        return False and exit.  Stores, then a fence, then the count (the CUDA threadFenceReduction
        pattern: the barrier makes the block's stores thread 0's, its release fence publishes them with the
        count, its acquire fence sees the other blocks'); the last block reads the slots from L2 (``ld.global.cg``)."""
        splits = cuda.gridDim.z
        tile = cuda.blockIdx.y * cuda.gridDim.x + cuda.blockIdx.x
        slot0 = int32(tile * splits) * (BM * BN)
        own = slot0 + int32(cuda.blockIdx.z) * (BM * BN)
        for i in range(tid, SPLIT_GROUPS, THREADS):
            four = ld_shared_v4(smem, tile_group(i))
            st_global_v4(split_ws, own + 4 * i, four[0], four[1], four[2], four[3])
        cuda.syncthreads()
        last = int32(0)
        if tid == 0:
            fence_acq_rel_gpu()
            last = int32(cuda.atomic.inc(split_count, tile, uint32(splits - 1)) == uint32(splits - 1))
            fence_acq_rel_gpu()
        if cuda.syncthreads_or(last) == 0:
            return False
        # The other slots' groups of this thread, SPLIT_CHUNK at a time: all of a slot's loads issued before
        # the first add (a load-add-store loop would wait for L2 once per group: H100, 128 x 64 tiles, +6 us).
        sums = cuda.local.array((SPLIT_CHUNK, 4), int32)
        part = cuda.local.array((SPLIT_CHUNK, 4), int32)
        for j0 in range(0, SPLIT_PER_THREAD, SPLIT_CHUNK):
            for j in range(SPLIT_CHUNK):
                i, live = split_group(tid, j0 + j)
                if live:
                    four = ld_shared_v4(smem, tile_group(i))
                    for e in range(4):
                        sums[j, e] = four[e]
            for z in range(splits):
                if z != cuda.blockIdx.z:
                    slot = slot0 + int32(z) * (BM * BN)
                    for j in range(SPLIT_CHUNK):
                        i, live = split_group(tid, j0 + j)
                        if live:
                            four = ld_global_cg_v4(split_ws, slot + 4 * i)
                            for e in range(4):
                                part[j, e] = four[e]
                    for j in range(SPLIT_CHUNK):
                        for e in range(4):
                            sums[j, e] = int32(sums[j, e] + part[j, e])
            for j in range(SPLIT_CHUNK):
                i, live = split_group(tid, j0 + j)
                if live:
                    at = tile_group(i)
                    st_shared_v2(smem, at, sums[j, 0], sums[j, 1])
                    st_shared_v2(smem, at + 2, sums[j, 2], sums[j, 3])
        cuda.syncthreads()
        return True

    @cuda.jit(device=True, inline="always")
    def thread_roles(tid):
        """Thread ``tid``'s lane, warp, and the warp's place in the block: (warp_m, warp_n, k-group)."""
        warp = tid >> 5
        return tid & 31, warp, warp % WM, (warp // WM) % WN, warp // (WM * WN)

    @cuda.jit(device=True, inline="always")
    def tile_origin(tile, tiles_n, tiles_m):
        """Output tile number ``tile`` (launch order) -> its first row and column (m0, n0).  With RASTER,
        grouped order (as in Triton's matmul tutorial): consecutive tiles walk down RASTER block-rows, then
        move one block-column right, so blocks running together share A and B panels in L2 instead of
        sweeping all of B once per block-row."""
        if RASTER:
            group, within = divmod_u32(tile, RASTER * tiles_n)
            rows_in_group = min(tiles_m - group * RASTER, RASTER)
            col, row = divmod_u32(within, rows_in_group)
            return (group * RASTER + row) * BM, col * BN
        row, col = divmod_u32(tile, tiles_n)
        return row * BM, col * BN

    @cuda.jit(device=True, inline="always")
    def plan_tile(smem, tid, m0, n0, M, N, kwords, a_src, a_dst, a_step, a_bytes, b_src, b_dst, b_step, b_bytes):
        """The copy plan of the tile at (m0, n0): the 16-byte chunks this thread moves every k-tile."""
        plan_operand(smem, tid, BM, M, m0, kwords, 0, A_ROWS, a_src, a_dst, a_step, a_bytes)
        plan_operand(smem, tid, BN, N, n0, kwords, A_ROWS * ROW_WORDS, B_ROWS, b_src, b_dst, b_step, b_bytes)

    @cuda.jit(device=True, inline="always")
    def fill_pipeline(smem, k_tiles, k_steps, a_words, b_words, a_pass,
                      a_src, a_dst, a_step, a_bytes, b_src, b_dst, b_step, b_bytes):
        """Prologue: k-tiles 0 .. AHEAD - 1 into stages 0 .. AHEAD - 1, a commit group each (empty past K)."""
        for s in range(AHEAD):
            if s < k_tiles:
                load_stage(smem, s, s, k_steps, a_words, b_words, a_pass,
                           a_src, a_dst, a_step, a_bytes, b_src, b_dst, b_step, b_bytes)
            cp_async_commit()

    @cuda.jit(device=True, inline="always")
    def multiply(smem, warp, warp_k, lanes, k_tiles, k_steps, a_words, b_words, a_pass,
                 a_src, a_dst, a_step, a_bytes, b_src, b_dst, b_step, b_bytes, acc, a_frag, b_frag):
        """The main loop over K (the pipeline filled): this warp's plane products of the pass into ``acc``.
        Each iteration waits for its stage, refills the stage read AHEAD k-tiles ago, and multiplies."""
        if WGMMA:
            wg_rows, acc0, acc1 = wgmma_start(warp)
            for kt in range(k_tiles):
                wait_for_stage()
                fence_proxy_async()  # the landed copies, visible to wgmma's (async proxy) reads ...
                cuda.syncthreads()  # ... everybody's, and k-tile kt - 2's groups are done everywhere
                nxt = kt + AHEAD
                if nxt < k_tiles:
                    load_stage(smem, nxt % STAGES, nxt, k_steps, a_words, b_words, a_pass,
                               a_src, a_dst, a_step, a_bytes, b_src, b_dst, b_step, b_bytes)
                cp_async_commit()
                acc0, acc1 = wgmma_stage(smem, (kt % STAGES) * STAGE_WORDS, wg_rows, acc0, acc1)
            wgmma_drain(acc, acc0, acc1)
        else:
            zero_accumulators(acc)
            for kt in range(k_tiles):
                wait_for_stage()  # this thread's copies of k-tile kt have landed ...
                cuda.syncthreads()  # ... everybody's too, and stage (kt - 1) % STAGES is free again
                nxt = kt + AHEAD
                if nxt < k_tiles:
                    load_stage(smem, nxt % STAGES, nxt, k_steps, a_words, b_words, a_pass,
                               a_src, a_dst, a_step, a_bytes, b_src, b_dst, b_step, b_bytes)
                cp_async_commit()
                compute_stage(smem, (kt % STAGES) * STAGE_WORDS, warp_k, lanes, acc, a_frag, b_frag)

    @cuda.jit(device=True, inline="always")
    def store_fragments(acc, pair_coef, m0, n0, warp_m, warp_n, lane, c_sw, c_const, sum_w, scale, bias, y, y_stride_m):
        """Persistent tiles' epilogue for a whole tile of a row-major output with rows of an even length and no
        column terms (c_sx = 0: the usual case), straight from the accumulators: no shared tile, no barrier -
        the stages already hold the next tile's first k-tiles.  A lane's elements of an m16n8 tile are rows g
        and g + 8, columns 2t and 2t + 1 (g = lane / 4, t = lane % 4): each row's pair is one 8-byte store,
        the 4 lanes of a row write one whole 32-byte sector.  No branch in the loops: they unroll, which keeps
        ``acc`` in registers (its indices known at compile time)."""
        g = lane >> 2
        t = lane & 3
        for mt in range(MT):
            for half in range(2):
                m = m0 + warp_m * 16 * MT + mt * 16 + g + 8 * half
                row_term = c_const + c_sw * sum_w[m]
                sc = scale[m]
                bi = bias[m]
                for nt in range(NT):
                    v0 = int32(row_term)
                    v1 = int32(row_term)
                    for j in range(PG):
                        for i in range(Q):
                            v0 += pair_coef[j, i] * acc[j, i, mt, nt, 2 * half]
                            v1 += pair_coef[j, i] * acc[j, i, mt, nt, 2 * half + 1]
                    at = m * y_stride_m + n0 + warp_n * 8 * NT + nt * 8 + 2 * t
                    if OUT_FLOAT:
                        y0 = f32_add_rn(f32_mul_rn(float32(v0), sc), bi)
                        y1 = f32_add_rn(f32_mul_rn(float32(v1), sc), bi)
                    else:
                        y0 = v0
                        y1 = v1
                    if STREAM_OUT:
                        st_global_cs_v2(y, at, y0, y1)
                    else:
                        st_global_v2(y, at, y0, y1)

    @cuda.jit(device=True, inline="always")
    def store_tile(smem, tid, m0, n0, M, N, c_sw, c_sx, c_const, sum_w, sum_x, scale, bias, y, y_stride_m, y_stride_n):
        """Epilogue step 2: walk the tile along the output's contiguous axis, four elements per
        thread at a time (16-byte loads and stores where the row allows): binary-encoding
        corrections, then int32 or float32 out."""
        if y_stride_n == 1 and FIXED_COLUMNS:
            # Each thread keeps four adjacent columns and walks down the rows: the column terms
            # (c_sx * SX[n]) are loaded once, each row costs one shared load, its row term and one store.
            vector = (y_stride_m & 3) == 0
            c = 4 * (tid % COLS4)
            n = n0 + c
            sx0 = c_sx * sum_x[n] if c_sx != 0 and n < N else 0
            sx1 = c_sx * sum_x[n + 1] if c_sx != 0 and n + 1 < N else 0
            sx2 = c_sx * sum_x[n + 2] if c_sx != 0 and n + 2 < N else 0
            sx3 = c_sx * sum_x[n + 3] if c_sx != 0 and n + 3 < N else 0
            if n < N:
                for r in range(tid // COLS4, min(BM, M - m0), THREADS // COLS4):
                    m = m0 + r
                    four = ld_shared_v4(smem, TILE_BASE + r * TILE_LD + c)
                    row_term = c_const + (c_sw * sum_w[m] if c_sw != 0 else 0)
                    at = m * y_stride_m + n
                    if OUT_FLOAT:
                        sc = scale[m]
                        bi = bias[m]
                        y0 = f32_add_rn(f32_mul_rn(float32(int32(four[0]) + row_term + sx0), sc), bi)
                        y1 = f32_add_rn(f32_mul_rn(float32(int32(four[1]) + row_term + sx1), sc), bi)
                        y2 = f32_add_rn(f32_mul_rn(float32(int32(four[2]) + row_term + sx2), sc), bi)
                        y3 = f32_add_rn(f32_mul_rn(float32(int32(four[3]) + row_term + sx3), sc), bi)
                    else:
                        y0 = int32(four[0]) + row_term + sx0
                        y1 = int32(four[1]) + row_term + sx1
                        y2 = int32(four[2]) + row_term + sx2
                        y3 = int32(four[3]) + row_term + sx3
                    if vector and n + 3 < N:
                        if STREAM_OUT:
                            st_global_cs_v4(y, at, y0, y1, y2, y3)
                        else:
                            st_global_v4(y, at, y0, y1, y2, y3)
                    else:
                        y[at] = y0
                        if n + 1 < N:
                            y[at + 1] = y1
                        if n + 2 < N:
                            y[at + 2] = y2
                        if n + 3 < N:
                            y[at + 3] = y3
        elif y_stride_n == 1:
            vector = (y_stride_m & 3) == 0
            for idx in range(tid, BM * (BN // 4), THREADS):
                r = idx // (BN // 4)
                c = 4 * (idx - r * (BN // 4))
                m = m0 + r
                n = n0 + c
                if m < M and n < N:
                    four = ld_shared_v4(smem, TILE_BASE + r * TILE_LD + c)
                    row_term = c_const + (c_sw * sum_w[m] if c_sw != 0 else 0)
                    at = m * y_stride_m + n
                    if vector and n + 3 < N:
                        y0 = finish(four[0], row_term, c_sx, sum_x, n, scale, bias, m)
                        y1 = finish(four[1], row_term, c_sx, sum_x, n + 1, scale, bias, m)
                        y2 = finish(four[2], row_term, c_sx, sum_x, n + 2, scale, bias, m)
                        y3 = finish(four[3], row_term, c_sx, sum_x, n + 3, scale, bias, m)
                        if STREAM_OUT:
                            st_global_cs_v4(y, at, y0, y1, y2, y3)
                        else:
                            st_global_v4(y, at, y0, y1, y2, y3)
                    else:
                        for e in range(4):
                            if n + e < N:
                                y[at + e] = finish(four[e], row_term, c_sx, sum_x, n + e, scale, bias, m)
        else:
            for idx in range(tid, BM * BN, THREADS):
                c = idx // BM
                r = idx - c * BM
                m = m0 + r
                n = n0 + c
                if m < M and n < N:
                    row_term = c_const + (c_sw * sum_w[m] if c_sw != 0 else 0)
                    one = int32(ld_shared(smem, TILE_BASE + r * TILE_LD + c))
                    y[m * y_stride_m + n * y_stride_n] = finish(one, row_term, c_sx, sum_x, n, scale, bias, m)

    def apmm(a_words, b_words, M, N, kwords, coef_w, coef_x, c_sw, c_sx, c_const,
             sum_w, sum_x, scale, bias, y, y_stride_m, y_stride_n):
        smem = stages_memory()  # dynamic: config.shared_bytes(p, q), given at launch
        tid = cuda.threadIdx.x
        lane, warp, warp_m, warp_n, warp_k = thread_roles(tid)
        if STAGGER_NS:
            # With one block per SM every block of a wave stores its output tile at the same moment (a burst
            # at DRAM speed while no SM multiplies); the first wave's odd blocks start late, and the SMs that
            # run them keep that phase, so half the SMs store while the other half multiply.
            linear = cuda.blockIdx.y * cuda.gridDim.x + cuda.blockIdx.x
            if (linear & 1) and linear < sm_count():
                sleep_ns(STAGGER_NS)
        if PERSISTENT:
            tiles_n, _ = divmod_u32(N + (BN - 1), BN)
            tiles_m, _ = divmod_u32(M + (BM - 1), BM)
            tile = cuda.blockIdx.x
            m0, n0 = tile_origin(tile, tiles_n, tiles_m)
        elif RASTER:
            m0, n0 = tile_origin(cuda.blockIdx.y * cuda.gridDim.x + cuda.blockIdx.x, cuda.gridDim.x, cuda.gridDim.y)
        else:
            m0 = cuda.blockIdx.y * BM
            n0 = cuda.blockIdx.x * BN
        k_steps = kwords // K_STEP_WORDS
        k_tiles = (k_steps + STEPS - 1) // STEPS

        # Copy plan: the 16-byte chunks this thread moves every k-tile (the same ones each time).
        a_src = cuda.local.array(A_COPIES, int64)
        a_dst = cuda.local.array(A_COPIES, int32)
        a_step = cuda.local.array(A_COPIES, int32)
        a_bytes = cuda.local.array(A_COPIES, int32)
        b_src = cuda.local.array(B_COPIES, int64)
        b_dst = cuda.local.array(B_COPIES, int32)
        b_step = cuda.local.array(B_COPIES, int32)
        b_bytes = cuda.local.array(B_COPIES, int32)
        plan_tile(smem, tid, m0, n0, M, N, kwords, a_src, a_dst, a_step, a_bytes, b_src, b_dst, b_step, b_bytes)

        # Rows whose ldmatrix addresses this lane gives: A (plane 0, m-tile 0), B pair (plane 0, n-tiles 0, 1).
        lanes = ldmatrix_lanes(warp_m, warp_n, lane)

        acc = cuda.local.array((PG, Q, MT, NT, 4), int32)
        a_frag = cuda.local.array((PG, MT, 4), int32)
        b_frag = cuda.local.array((Q, NT, 2), int32)
        pair_coef = cuda.local.array((PG, Q), int32)

        if PERSISTENT:
            # One pass, one k-group, tile after tile.  A whole tile of a row-major output without column terms
            # (the usual case) issues the next tile's first k-tiles, then stores its accumulators straight from
            # the registers: the next tile's fill runs under the stores (a new block's launch, copy plan and
            # fill would follow them).  Other tiles (ragged edges, c_sx != 0, odd rows, a column-major output)
            # take the shared tile as the other tiles do, then the next tile's fill.
            for j in range(PG):
                for i in range(Q):
                    pair_coef[j, i] = coef_w[j] * coef_x[i]
            direct_layout = c_sx == 0 and y_stride_n == 1 and (y_stride_m & 1) == 0
            fill_pipeline(smem, k_tiles, k_steps, a_words, b_words, int64(0),
                          a_src, a_dst, a_step, a_bytes, b_src, b_dst, b_step, b_bytes)
            while tile < tiles_n * tiles_m:
                multiply(smem, warp, warp_k, lanes, k_tiles, k_steps, a_words, b_words, int64(0),
                         a_src, a_dst, a_step, a_bytes, b_src, b_dst, b_step, b_bytes, acc, a_frag, b_frag)
                nxt = tile + cuda.gridDim.x
                next_m0, next_n0 = tile_origin(nxt, tiles_n, tiles_m)
                if direct_layout and m0 + BM <= M and n0 + BN <= N:
                    cuda.syncthreads()  # every warp is done reading the stages
                    if nxt < tiles_n * tiles_m:
                        plan_tile(smem, tid, next_m0, next_n0, M, N, kwords,
                                  a_src, a_dst, a_step, a_bytes, b_src, b_dst, b_step, b_bytes)
                        fill_pipeline(smem, k_tiles, k_steps, a_words, b_words, int64(0),
                                      a_src, a_dst, a_step, a_bytes, b_src, b_dst, b_step, b_bytes)
                    store_fragments(acc, pair_coef, m0, n0, warp_m, warp_n, lane, c_sw, c_const, sum_w,
                                    scale, bias, y, y_stride_m)
                else:
                    fold_into_tile(smem, 0, acc, pair_coef, coef_w, coef_x, warp_m, warp_n, warp_k, lane)
                    store_tile(smem, tid, m0, n0, M, N, c_sw, c_sx, c_const, sum_w, sum_x, scale, bias, y,
                               y_stride_m, y_stride_n)
                    cuda.syncthreads()  # the tile is read before the next tile's copies land over it
                    if nxt < tiles_n * tiles_m:
                        plan_tile(smem, tid, next_m0, next_n0, M, N, kwords,
                                  a_src, a_dst, a_step, a_bytes, b_src, b_dst, b_step, b_bytes)
                        fill_pipeline(smem, k_tiles, k_steps, a_words, b_words, int64(0),
                                      a_src, a_dst, a_step, a_bytes, b_src, b_dst, b_step, b_bytes)
                tile = nxt
                m0 = next_m0
                n0 = next_n0
            wait_all()  # (a block given no tile leaves no copy in flight)
            return

        for ps in range(PASSES):
            a_pass = int64(ps * PG) * M * kwords
            fill_pipeline(smem, k_tiles, k_steps, a_words, b_words, a_pass,
                          a_src, a_dst, a_step, a_bytes, b_src, b_dst, b_step, b_bytes)
            multiply(smem, warp, warp_k, lanes, k_tiles, k_steps, a_words, b_words, a_pass,
                     a_src, a_dst, a_step, a_bytes, b_src, b_dst, b_step, b_bytes, acc, a_frag, b_frag)
            # Epilogue step 1: plane pairs weighted cw_j * cx_i -> the int32 output tile in shared
            # memory.  With one pass it lies over the stages, so wait until every warp is done.
            fold_into_tile(smem, ps, acc, pair_coef, coef_w, coef_x, warp_m, warp_n, warp_k, lane)

        # Epilogue step 2: walk the tile along the output's contiguous axis.
        store_tile(smem, tid, m0, n0, M, N, c_sw, c_sx, c_const, sum_w, sum_x, scale, bias, y, y_stride_m, y_stride_n)

    @cuda.jit(device=True, inline="always")
    def inside(ih, iw, H, W):
        """Input pixel (ih, iw) is in the image (one unsigned compare a side: negatives wrap past it)."""
        return uint32(ih) < uint32(H) and uint32(iw) < uint32(W)

    @cuda.jit(device=True, inline="always")
    def border_tap_sum(tap_sums, m, ih0, iw0, H, W, R, S):
        """Sum over the taps of output channel m that fall inside the image (a border pixel's SWv)."""
        total = int32(0)
        for r in range(R):
            for s in range(S):
                if inside(ih0 + r, iw0 + s, H, W):
                    total += tap_sums[m * R * S + r * S + s]
        return total

    @cuda.jit(device=True, inline="always")
    def divide(n, geometry, at):
        """(n // d, n % d) for the launch-constant divisor d = geometry[at], by its magic numbers
        (conv_geometry): ~3 instructions, not a ~20-instruction division chain."""
        return divmod_magic(n, geometry[at], geometry[at + 1], geometry[at + 2])

    @cuda.jit(device=True, inline="always")
    def output_pixel(n, geometry):
        """GEMM row n -> (image, oh, ow) of the convolution's output (with pooling: window-major order)."""
        if POOL:
            window, sub = n >> 2, n & 3
            img, rest = divide(window, geometry, GEO_PIXELS)
            ph, pw = divide(rest, geometry, GEO_ROW)
            return img, 2 * ph + (sub >> 1), 2 * pw + (sub & 1)
        img, rest = divide(n, geometry, GEO_PIXELS)
        oh, ow = divide(rest, geometry, GEO_ROW)
        return img, oh, ow

    @cuda.jit(device=True, inline="always")
    def column_terms(at, shift, n0, N, geometry, stride, pad, H, W, R, S, ew, sum_x, lane):
        """Slot ``at`` of the tile's column terms: tile pixel cc = at >> shift, whose valid taps split over
        the 2^shift lanes of its group (BN << shift is a multiple of 32: whole warps run each slot, so the
        shuffles that add the lanes' sums are convergent; a 1x1 window's one tap is one lane's - measured:
        idle lanes there cost 5%).  Returns (cc, the lane's place in its group, the valid taps, the sum of
        their pixel sums SXv (ew != 0), ih0, iw0)."""
        cc = at >> shift
        img, oh, ow = output_pixel(min(n0 + cc, N - 1), geometry)
        ih0 = int32(oh * stride - pad)
        iw0 = int32(ow * stride - pad)
        # The taps inside the image: filter rows [r_lo, r_hi) x columns [s_lo, s_hi) (counted, not
        # walked: an 11x11 stem has 121 taps).
        r_lo, r_hi = int32(max(-ih0, 0)), int32(min(H - ih0, R))
        s_lo, s_hi = int32(max(-iw0, 0)), int32(min(W - iw0, S))
        cols = int32(max(s_hi - s_lo, 0))
        taps = int32(max(r_hi - r_lo, 0) * cols)
        sx = int32(0)
        first = int32(at & ((1 << shift) - 1))  # this lane's first tap in the pixel's group
        if ew != 0:
            t = first
            while t < taps:
                dr, ds = divmod_u32(t, cols)
                sx += sum_x[int32(int32(img * H + ih0 + r_lo + int32(dr)) * W + iw0 + s_lo + int32(ds))]
                t = int32(t + (1 << shift))
            if shift > 0:  # (the same in the whole block)
                sx = tap_lanes_sum(sx, lane)
        return cc, first, taps, sx, ih0, iw0

    @cuda.jit(device=True, inline="always")
    def store_column_terms(smem, cc, kv, sx, ih0, iw0):
        """Tile pixel cc's Kv (valid taps x C), SXv, ih0 and iw0 into the tile's columns (COL_BASE)."""
        st_shared(smem, COL_BASE + cc, kv)
        st_shared(smem, COL_BASE + BN + cc, sx)
        st_shared(smem, COL_BASE + 2 * BN + cc, ih0)
        st_shared(smem, COL_BASE + 3 * BN + cc, iw0)

    @cuda.jit(device=True, inline="always")
    def pixel_terms(smem, cc, c_k, ew, full):
        """Tile pixel cc's column term ``c_k * Kv + ew * SXv`` and whether a tap of it falls outside."""
        kv = int32(ld_shared(smem, COL_BASE + cc))
        col = int32(c_k * kv)
        if ew != 0:
            col = int32(col + ew * int32(ld_shared(smem, COL_BASE + BN + cc)))
        return col, kv != full

    @cuda.jit(device=True, inline="always")
    def weight_sum_term(smem, cc, border, ex, ch_sum_w, mc, tap_sums, H, W, R, S):
        """``ex * SWv[m, n]`` of tile pixel cc and channel mc: the channel's weight sum over the taps inside
        the image (ch_sum_w, its SW, where every tap is; ``border``: from :func:`pixel_terms`)."""
        if border:
            ih0 = int32(ld_shared(smem, COL_BASE + 2 * BN + cc))
            iw0 = int32(ld_shared(smem, COL_BASE + 3 * BN + cc))
            return int32(ex * border_tap_sum(tap_sums, mc, ih0, iw0, H, W, R, S))
        return int32(ex * ch_sum_w)

    @cuda.jit(device=True, inline="always")
    def conv_sum(smem, cc, wi, lane, col, border, ex, ch_sum_w, mc, tap_sums, H, W, R, S):
        """The int32 sum y of tile pixel cc, channel 32 * wi + lane, corrections included (col, border:
        :func:`pixel_terms`; ch_sum_w: the channel's SW, used by pixels with every tap inside)."""
        v = int32(int32(ld_shared(smem, TILE_BASE + cc * TILE_LD + 32 * wi + lane)) + col)
        if ex != 0:
            v = int32(v + weight_sum_term(smem, cc, border, ex, ch_sum_w, mc, tap_sums, H, W, R, S))
        return v

    @cuda.jit(device=True, inline="always")
    def conv_value(smem, cc, wi, lane, col, border, ex, ch_sum_w, mc, ch_scale, ch_bias, tap_sums, H, W, R, S):
        """The float32 ``y * scale + bias`` of :func:`conv_sum`."""
        v = conv_sum(smem, cc, wi, lane, col, border, ex, ch_sum_w, mc, tap_sums, H, W, R, S)
        return f32_add_rn(f32_mul_rn(float32(v), ch_scale), ch_bias)

    @cuda.jit(device=True, inline="always")
    def store_codes(y, row_at, wi, plane_words, lane, code, valid, room):
        """The lanes' codes of tile word wi - 32 channels - into the output row starting at word ``row_at``:
        bit planes by ballots, or (OUT_BYTES) 32 code bytes, four lanes a word, within the ``room`` words
        the row has from row_at (a tile's words past M may pass the row's end: a 96- or 192-row tile's last
        words can lie past the row's padding, in the next row); returns their code sum."""
        if not OUT_BYTES:
            # Past the room no lane's channel is valid (its ballots are 0); there the words' storing lane is
            # 32, which no lane is - a predicate, not a branch, so the words of a pixel schedule as one block.
            pattern = encode_code(code, OUT_BITS, OUT_ENC) if valid else 0
            return store_word_at(y, uint64(row_at) + uint64(wi), plane_words, OUT_BITS, OUT_ENC, lane if wi < room else 32,
                                 pattern, valid)
        four = uint32(code & 0xFF) << (8 * (lane & 3)) if valid else uint32(0)
        four |= uint32(shfl_idx(int32(four), lane ^ 1))
        four |= uint32(shfl_idx(int32(four), lane ^ 2))
        if (lane & 3) == 0 and 8 * wi + (lane >> 2) < room:
            y[uint64(row_at) + uint64(8 * wi + (lane >> 2))] = four
        return warp_sum(code if valid else 0, lane)

    @cuda.jit(device=True, inline="always")
    def level_code(v, thresholds, row, lo):
        """The requantized code of sum v by integer comparisons: thresholds[row] = [sign, T_1 .. T_LEVELS]."""
        yy = int32(v * thresholds[row, 0])
        code = int32(lo)
        for k in range(LEVELS):
            code += LEVEL_STEP if yy > thresholds[row, k + 1] else 0
        return code

    @cuda.jit(device=True, inline="always")
    def level_pattern(v, thresholds, row, valid):
        """The bit pattern of :func:`level_code`'s code (0 where not ``valid``) straight from the comparisons.
        A channel's thresholds rise (the requantizer is monotone: ``reference.requantize_thresholds``), so
        the passed ones are T_1 .. T_c, and bit j of c - floor(c / 2^j) odd - is the XOR of passing
        T_{2^j}, T_{2 * 2^j}, ...; signed codes lo + c (lo = -2^(b-1)) flip the top bit, +-1 codes
        -1 + 2c have the pattern c.  No count, no encoding: a few predicates a bit plane."""
        yy = int32(v * thresholds[row, 0])
        pattern = int32(0)
        for j in range(OUT_BITS):
            bit = SIGNED_OUT and j == OUT_BITS - 1
            for m in range(1, LEVELS // (1 << j) + 1):
                bit = bit != (yy > thresholds[row, m << j])
            pattern |= int32(bit and valid) << j
        return pattern

    @cuda.jit(device=True, inline="always")
    def load_levels(thresholds, mc, dst, row):
        """Channel mc's sign and thresholds into dst[row] (registers, where the loops over rows unroll)."""
        for k in range(LEVEL_COLS):
            dst[row, k] = thresholds[mc * LEVEL_COLS + k]

    def tap_gatherer(copy, NBYTES):
        @cuda.jit(device=True, inline="always")
        def gather_tap(smem, dst_bytes, b_words, b_dst, b_pixel, b_ih0, b_iw0, r, s, word, step_live, H, W, cwords):
            """This thread's B copies of one tap (r, s) of its pixels: NBYTES from word ``word`` of input
            pixel (ih0 + r, iw0 + s) to its slot + ``dst_bytes`` - zero-filled outside the image or past K."""
            for c in range(B_COPIES):
                if B_WHOLE or b_dst[c] >= 0:
                    ih = int32(b_ih0[c] + r)
                    iw = int32(b_iw0[c] + s)
                    live = step_live and inside(ih, iw, H, W)
                    src = int32(b_pixel[c] * cwords + word)
                    copy(smem, int32(b_dst[c] + dst_bytes), b_words, src if live else int32(0), NBYTES if live else 0)

        return gather_tap

    gather_chunk, gather_word = tap_gatherer(cp_async_16, 16), tap_gatherer(cp_async_4, 4)

    @cuda.jit(device=True, inline="always")
    def load_word_taps(smem, base, b_words, b_dst, b_pixel, b_ih0, b_iw0, word_r, word_s, step_live, H, W, cwords):
        """This thread's B chunks of a stage when a tap is one word: four taps a chunk, each a 4-byte
        copy from its own input pixel (zero-filled outside the image)."""
        base_bytes = int32(base << 2)
        for i in range(4):
            at = int32(int32(word_r[i] * W + word_s[i]) * cwords)
            gather_word(smem, int32(base_bytes + 4 * i), b_words, b_dst, b_pixel, b_ih0, b_iw0, word_r[i], word_s[i], at,
                        step_live, H, W, cwords)

    @cuda.jit(device=True, inline="always")
    def advance_word_taps(word_r, word_s, stage_r, stage_s, S):
        """The four taps ROW_WORDS taps on (the next k-tile): stage_r rows and stage_s columns, carried."""
        for i in range(4):
            s_ = int32(word_s[i] + stage_s)
            carry = s_ >= S
            word_s[i] = int32(s_ - S) if carry else s_
            word_r[i] = int32(word_r[i] + stage_r + (1 if carry else 0))

    def apconv(a_words, b_words, M, N, kwords, geometry, coef_w, coef_x, ex, ew, c_k,
               sum_w, tap_sums, sum_x, scale, bias, y, y_rowsum, epi, res_words, res_scale, thresholds,
               split_ws, split_count):
        """Implicit-GEMM convolution: a_words = weights (K_out x kwords: R*S taps of tap_words words, padded
        to whole k-steps), b_words = NHWC activations.

        geometry: [H, W, cwords, R, S, stride, padding, OH, OW, C, tap_words, then (divisor, magic, shift)
        of four divisors] (``conv_geometry``; cwords: words of an input pixel; tap_words: of a tap along K,
        ``reference.conv_tap_words``).  y: NHWC output, y[n * M + m];
        packed output: y = the next layer's words (bits, N, out_cwords), y_rowsum its row sums (zeroed
        before the launch), epi = [out_bits, out_encoding, out_zero_point, relu, res_bits, res_encoding,
        res_zero_point, out_cwords, res_cwords] (res_bits 0: no residual), res_words the residual's words.
        Corrections (reference.py, convolution): per output pixel n with Kv = valid taps x C,
            y = sum of plane pairs + ex * SWv[m, n] + ew * SXv[n] + c_k * Kv
        split_ws, split_count: split K's workspace (config.split_words int32) and per-tile counters (uint32,
        zero before the first launch; each launch leaves them zero) - see split_k_reduce.
        """
        smem = stages_memory()
        tid = cuda.threadIdx.x
        lane, warp, warp_m, warp_n, warp_k = thread_roles(tid)
        m0 = cuda.blockIdx.y * BM
        n0 = cuda.blockIdx.x * BN
        H = geometry[0]
        W = geometry[1]
        cwords = geometry[2]
        R = geometry[3]
        S = geometry[4]
        stride = geometry[5]
        pad = geometry[6]
        C = geometry[9]
        images, _ = divide(N >> 2 if POOL else N, geometry, GEO_PIXELS)
        pixels = int32(images * H * W)  # input pixels of all images
        tap_words = geometry[10]  # words of one tap along K
        k_steps = int32(kwords >> 3)  # = ceil(R * S * tap_words / 8)
        k_tiles = int32((k_steps + STEPS - 1) // STEPS)
        kt_first = int32(0)  # this block's first k-tile (split K: a share of them)
        if SPLIT:
            kt_first, k_tiles = split_k_range(k_tiles)

        # A (weights): the GEMM copy plan.
        a_src = cuda.local.array(A_COPIES, int64)
        a_dst = cuda.local.array(A_COPIES, int32)
        a_step = cuda.local.array(A_COPIES, int32)
        a_bytes = cuda.local.array(A_COPIES, int32)
        plan_operand(smem, tid, BM, M, m0, kwords, 0, A_ROWS, a_src, a_dst, a_step, a_bytes)
        # B (activations): each copy slot is one output pixel's chunk; which input pixel it reads
        # depends on the tap of the k-step, so keep the pixel's corner (ih0, iw0) and its image's
        # first pixel.  THREADS is a multiple of CHUNKS, so every slot of a thread has the same
        # chunk: one k-step (and one tap counter) per thread.
        # (32-bit arithmetic throughout - the host checks that every operand has < 2^31 words - and
        # 32-bit loop counters: numba's default 64-bit ones cost two instructions per use.)
        chunk = tid % CHUNKS
        b_dst = cuda.local.array(B_COPIES, int32)  # shared byte address in stage 0, -1: no slot
        b_pixel = cuda.local.array(B_COPIES, int32)  # plane * pixels + the corner pixel (ih0, iw0) of the window
        b_ih0 = cuda.local.array(B_COPIES, int32)
        b_iw0 = cuda.local.array(B_COPIES, int32)
        for c in range(B_COPIES):
            prow = (c * THREADS + tid) // CHUNKS
            plane = prow // BN
            b_dst[c] = int32(smem_addr(smem, A_ROWS * ROW_WORDS + swizzle(prow, chunk))) if prow < B_ROWS else -1
            if c >= PIXEL_SLOTS:  # another plane of a slot's pixel (compile-time): its corner, a plane on
                b_pixel[c] = int32(b_pixel[c - PIXEL_SLOTS] + pixels)
                b_ih0[c] = b_ih0[c - PIXEL_SLOTS]
                b_iw0[c] = b_iw0[c - PIXEL_SLOTS]
                continue
            n = n0 + prow - plane * BN
            img, oh, ow = output_pixel(min(n, N - 1), geometry)
            ih0 = int32(oh * stride - pad)
            iw0 = int32(ow * stride - pad)
            b_pixel[c] = int32(plane * pixels + img * H * W + ih0 * W + iw0)
            b_ih0[c] = ih0 if n < N else -(1 << 24)  # rows past N never fall inside
            b_iw0[c] = iw0

        # Per output pixel of the tile: valid taps x C and the sum of the valid taps' pixel sums (see
        # column_terms).  Where each thread has at most one (pixel, lane) slot (COLUMN_SLOT), computed in the
        # main loop once the first stages' copies are issued: the gather's loads then wait under the
        # pipeline's fill, not after the products.  (H100, ResNet-18's 3x3 layers at batch 256, w1a2 with
        # the fused epilogue, together with the epilogue's straight words below: 4-9% less time.)
        col_shift = int32(TAP_SHIFT if R * S > 1 else 0)
        col_live = tid < (BN << col_shift)  # (whole warps: BN << col_shift is a multiple of 32)
        col_cc, col_first, col_taps, col_sx, col_ih0, col_iw0 = 0, 1, 0, 0, 0, 0

        word_r = cuda.local.array(4, int32)  # word taps: the chunk's four taps
        word_s = cuda.local.array(4, int32)
        stage_r, stage_s = divide(ROW_WORDS, geometry, GEO_S)  # a stage's taps, as filter rows and columns
        stage_r, stage_s = int32(stage_r), int32(stage_s)

        lanes = ldmatrix_lanes(warp_m, warp_n, lane)
        acc = cuda.local.array((PG, Q, MT, NT, 4), int32)
        a_frag = cuda.local.array((PG, MT, 4), int32)
        b_frag = cuda.local.array((Q, NT, 2), int32)
        pair_coef = cuda.local.array((PG, Q), int32)

        for ps in range(PASSES):
            if not WGMMA:  # (wgmma_start zeroes its own; wgmma_drain writes every element of acc)
                zero_accumulators(acc)
            a_pass = int64(ps * PG) * M * kwords
            # The tap (r, s) and the word within it of this thread's chunk in the next stage to load.
            # (K runs over taps of tap_words words: whole k-steps of the pixel's channel words, or 4 words -
            # half a k-step, one 16-byte chunk - for at most 128 channels, so two taps share an mma.)
            step = int32(chunk >> 1)
            # this thread's chunk: its tap, its word in the tap
            tap, c_word = divide(4 * chunk + kt_first * ROW_WORDS, geometry, GEO_TAP)
            tap_r, tap_s = divide(tap, geometry, GEO_S)
            tap_r, tap_s, c_word = int32(tap_r), int32(tap_s), int32(c_word)
            if WORD_TAPS:  # the chunk's four taps (r, s), each advanced by a stage's ROW_WORDS taps per k-tile
                for i in range(4):
                    r, s_ = divide(4 * chunk + i + kt_first * ROW_WORDS, geometry, GEO_S)
                    word_r[i], word_s[i] = int32(r), int32(s_)

            load_slot = int32(0)  # the ring stage k-tile kt goes to, and the one k-tile kt - AHEAD is in
            compute_slot = int32(0)
            if WGMMA:
                wg_rows, acc0, acc1 = wgmma_start(warp)
            for kt in range(int32(k_tiles + AHEAD)):
                # The APMM pipeline, prologue folded in: step kt loads k-tile kt and, once the ring is
                # full (but one stage: wgmma), waits for and computes k-tile kt - AHEAD.
                ct = int32(kt - AHEAD)
                if ct >= 0:
                    wait_for_stage()
                    if WGMMA:
                        fence_proxy_async()
                    cuda.syncthreads()
                if kt < k_tiles:
                    base = int32(load_slot * STAGE_WORDS)
                    load_slot = int32(0) if load_slot == STAGES - 1 else int32(load_slot + 1)
                    step0 = int32((kt_first + kt) * STEPS)
                    copy_a(smem, base, step0, k_steps, a_words, a_pass, a_src, a_dst, a_step, a_bytes)
                    step_live = int32(step0 + step) < k_steps
                    if WORD_TAPS:
                        load_word_taps(smem, base, b_words, b_dst, b_pixel, b_ih0, b_iw0, word_r, word_s, step_live,
                                       H, W, cwords)
                        advance_word_taps(word_r, word_s, stage_r, stage_s, S)
                    else:
                        tap_at = int32(int32(tap_r * W + tap_s) * cwords + c_word)
                        gather_chunk(smem, int32(base << 2), b_words, b_dst, b_pixel, b_ih0, b_iw0, tap_r, tap_s, tap_at,
                                     step_live, H, W, cwords)
                        c_word = int32(c_word + ROW_WORDS)  # advance this thread's chunk by one stage
                        while c_word >= tap_words:  # (past the last tap: weights are zero there, any pixel will do)
                            c_word = int32(c_word - tap_words)
                            tap_s = int32(tap_s + 1)
                            if tap_s == S:
                                tap_s = int32(0)
                                tap_r = int32(tap_r + 1)
                cp_async_commit()
                if COLUMN_SLOT and kt == AHEAD - 1 and ps == 0 and col_live:
                    col_cc, col_first, col_taps, col_sx, col_ih0, col_iw0 = column_terms(
                        tid, col_shift, n0, N, geometry, stride, pad, H, W, R, S, ew, sum_x, lane)
                if ct >= 0:
                    if WGMMA:
                        acc0, acc1 = wgmma_stage(smem, int32(compute_slot * STAGE_WORDS), wg_rows, acc0, acc1)
                    else:
                        compute_stage(smem, int32(compute_slot * STAGE_WORDS), warp_k, lanes, acc, a_frag, b_frag)
                    compute_slot = int32(0) if compute_slot == STAGES - 1 else int32(compute_slot + 1)
            if WGMMA:
                wgmma_drain(acc, acc0, acc1)

            fold_into_tile(smem, ps, acc, pair_coef, coef_w, coef_x, warp_m, warp_n, warp_k, lane)

        if SPLIT and not split_k_reduce(smem, split_ws, split_count, tid):
            return  # another block of this tile adds the partial sums and runs the epilogue

        # The column terms into shared memory, for the epilogue (the fold's barrier is behind us: the
        # region may lie over the stages).
        if COLUMN_SLOT:
            if col_live and col_first == 0:
                store_column_terms(smem, col_cc, col_taps * C, col_sx, col_ih0, col_iw0)
        else:
            for at in range(tid, BN << col_shift, THREADS):
                cc, first, taps, sx, ih0, iw0 = column_terms(at, col_shift, n0, N, geometry, stride, pad, H, W, R, S,
                                                            ew, sum_x, lane)
                if first == 0:
                    store_column_terms(smem, cc, taps * C, sx, ih0, iw0)
        cuda.syncthreads()

        full = int32(R * S * C)
        if OUT_PACK:
            # The fused epilogue, one warp per pixel, 32 channels a lane-sweep: affine, residual, ReLU and
            # the next layer's quantizer on each lane's channel, then one ballot per bit plane packs the
            # word.  The precisions are compile-time (plane loops unrolled); a lane's channel constants
            # for every word of the tile are loaded once, a pixel's column terms once per pixel; a pixel's
            # code sum is written once (stored when the block holds all its channels, else one atomic add
            # to the zeroed sum).  32-bit index arithmetic (the host checks the sizes).
            out_zp = epi[2]
            relu = epi[3]
            res_zp = epi[6]
            out_cw = epi[7]
            res_cw = epi[8]
            lo, hi = code_range(OUT_BITS, OUT_ENC)
            word0 = int32(m0 >> 5)
            out_rows = int32(N >> 2) if POOL else N
            out_plane = int32(out_rows * out_cw)  # words of one plane of the output
            res_plane = int32(N * res_cw)
            if not POOL:
                # A lane's channel constants for every word of the tile (registers: the word loop
                # below unrolls; the pooling one stays a loop, so it loads them per word).
                ch_valid = cuda.local.array(WORDS_PER_COLUMN, int32)
                ch_m = cuda.local.array(WORDS_PER_COLUMN, int32)
                ch_scale = cuda.local.array(WORDS_PER_COLUMN, float32)
                ch_bias = cuda.local.array(WORDS_PER_COLUMN, float32)
                ch_sum_w = cuda.local.array(WORDS_PER_COLUMN, int32)
                for wi in range(WORDS_PER_COLUMN):
                    m = int32(m0 + 32 * wi + lane)
                    ch_valid[wi] = m < M
                    ch_m[wi] = min(m, M - 1)
                    ch_scale[wi] = scale[ch_m[wi]]
                    ch_bias[wi] = bias[ch_m[wi]]
                    ch_sum_w[wi] = sum_w[ch_m[wi]] if ex != 0 else 0
                res_planes = cuda.local.array((RES_ARRAY_PLANES, WORDS_PER_COLUMN), uint32)
                sums = cuda.local.array(WORDS_PER_COLUMN, int32)  # a pixel's sums, one per word of the tile
                ch_levels = cuda.local.array((WORDS_PER_COLUMN, LEVEL_COLS), int32)
                if LEVELS:
                    for wi in range(WORDS_PER_COLUMN):
                        load_levels(thresholds, ch_m[wi], ch_levels, wi)
            out_n = int32(warp)  # the warp's output row (a pooling window, or a pixel)
            while out_n < (BN >> 2 if POOL else BN):
                n = int32(n0 + (out_n << 2 if POOL else out_n))
                if n < N:  # the same for the whole warp: the ballots stay convergent
                    row = int32(n >> 2) if POOL else n
                    out_at = int32(row * out_cw + (8 * word0 if OUT_BYTES else word0))  # the tile's first word in the row
                    room = int32(out_cw - (8 * word0 if OUT_BYTES else word0))  # the row's words from out_at
                    total = int32(0)
                    if POOL:
                        # Each window is 4 consecutive tile rows: ReLU'd values pooled in float32, then quantized.
                        cc = int32(out_n << 2)
                        col0, border0 = pixel_terms(smem, cc, c_k, ew, full)
                        col1, border1 = pixel_terms(smem, cc + 1, c_k, ew, full)
                        col2, border2 = pixel_terms(smem, cc + 2, c_k, ew, full)
                        col3, border3 = pixel_terms(smem, cc + 3, c_k, ew, full)
                        for wi in range(WORDS_PER_COLUMN):
                            m = int32(m0 + 32 * wi + lane)
                            mc = min(m, M - 1)
                            sw = sum_w[mc] if ex != 0 else 0
                            valid = m < M
                            sc, bi = scale[mc], bias[mc]
                            t0 = conv_value(smem, cc, wi, lane, col0, border0, ex, sw, mc, sc, bi, tap_sums, H, W, R, S)
                            t1 = conv_value(smem, cc + 1, wi, lane, col1, border1, ex, sw, mc, sc, bi, tap_sums, H, W, R, S)
                            t2 = conv_value(smem, cc + 2, wi, lane, col2, border2, ex, sw, mc, sc, bi, tap_sums, H, W, R, S)
                            t3 = conv_value(smem, cc + 3, wi, lane, col3, border3, ex, sw, mc, sc, bi, tap_sums, H, W, R, S)
                            if relu != 0:
                                t0 = t0 if t0 > 0 else float32(0)
                                t1 = t1 if t1 > 0 else float32(0)
                                t2 = t2 if t2 > 0 else float32(0)
                                t3 = t3 if t3 > 0 else float32(0)
                            if POOL == 1:
                                t = max(max(t0, t1), max(t2, t3))
                            else:  # (top pair + bottom pair) / 4, each sum rounded: the reference's order
                                t = f32_mul_rn(f32_add_rn(f32_add_rn(t0, t1), f32_add_rn(t2, t3)), float32(0.25))
                            code = quantize_code(t, out_zp, lo, hi, OUT_ENC)
                            total += store_codes(y, out_at, wi, out_plane, lane, code, valid, room)
                    else:
                        cc = out_n
                        col, border = pixel_terms(smem, cc, c_k, ew, full)
                        if RES_BITS > 0:
                            # The pixel's residual words, every load issued before the first store (the
                            # stores below could alias them, so the compiler would not hoist them itself).
                            res_at = uint64(n) * uint64(res_cw) + uint64(word0)
                            for j in range(RES_BITS):
                                for wi in range(WORDS_PER_COLUMN):
                                    res_planes[j, wi] = res_words[res_at + uint64(j) * uint64(res_plane) + uint64(wi)]
                        # The pixel's words as one straight block: every tile load first, the weight-sum
                        # term (branches: borders) apart, then codes and ballots - no branch between the
                        # words, so their dependent chains interleave (the epilogue is latency bound).
                        for wi in range(WORDS_PER_COLUMN):
                            sums[wi] = int32(int32(ld_shared(smem, TILE_BASE + cc * TILE_LD + 32 * wi + lane)) + col)
                        if ex != 0:
                            for wi in range(WORDS_PER_COLUMN):
                                sums[wi] = int32(sums[wi] + weight_sum_term(smem, cc, border, ex, ch_sum_w[wi], ch_m[wi],
                                                                            tap_sums, H, W, R, S))
                        for wi in range(WORDS_PER_COLUMN):
                            valid = ch_valid[wi] != 0
                            if LEVEL_PATTERNS:  # integer comparisons: affine, ReLU, quantizer and encoding in one
                                pattern = level_pattern(sums[wi], ch_levels, wi, valid)
                                total += store_word_at(y, uint64(out_at) + uint64(wi), out_plane, OUT_BITS, OUT_ENC,
                                                       lane if wi < room else 32, pattern, valid)
                                continue
                            if LEVELS:
                                code = level_code(sums[wi], ch_levels, wi, lo)
                            else:
                                t = f32_add_rn(f32_mul_rn(float32(sums[wi]), ch_scale[wi]), ch_bias[wi])
                                if RES_BITS > 0:
                                    rc = lane_code(res_planes, wi, RES_BITS, RES_ENC, lane)
                                    t = f32_add_rn(t, f32_mul_rn(float32(rc - res_zp), res_scale))
                                if relu != 0 and not t > 0:
                                    t = float32(0)
                                code = quantize_code(t, out_zp, lo, hi, OUT_ENC)  # scale 1
                            total += store_codes(y, out_at, wi, out_plane, lane, code, valid, room)
                    if lane == 0:
                        if WHOLE_ROWS:
                            y_rowsum[row] = total
                        else:
                            cuda.atomic.add(y_rowsum, row, total)
                out_n = int32(out_n + THREADS // 32)
        else:
            # Epilogue step 2 along m (NHWC is channel-contiguous): corrections, then int32 or float32.
            vector = (M & 3) == 0
            for idx in range(tid, BN * (BM // 4), THREADS):
                cc = idx // (BM // 4)
                r4 = 4 * (idx - cc * (BM // 4))
                n = n0 + cc
                m = m0 + r4
                if n < N and m < M:
                    four = ld_shared_v4(smem, TILE_BASE + cc * TILE_LD + r4)
                    kv = int32(ld_shared(smem, COL_BASE + cc))
                    col_term = c_k * kv + (ew * int32(ld_shared(smem, COL_BASE + BN + cc)) if ew != 0 else 0)
                    ih0 = int32(ld_shared(smem, COL_BASE + 2 * BN + cc))
                    iw0 = int32(ld_shared(smem, COL_BASE + 3 * BN + cc))
                    out = cuda.local.array(4, OUT_DTYPE)
                    for e in range(4):
                        v = int32(four[e]) + col_term
                        if ex != 0 and m + e < M:
                            v += ex * (sum_w[m + e] if kv == full else border_tap_sum(tap_sums, m + e, ih0, iw0, H, W, R, S))
                        if OUT_FLOAT:
                            out[e] = f32_add_rn(f32_mul_rn(float32(v), scale[min(m + e, M - 1)]), bias[min(m + e, M - 1)])
                        else:
                            out[e] = v
                    at = n * M + m
                    if vector and m + 3 < M:
                        st_global_v4(y, at, out[0], out[1], out[2], out[3])
                    else:
                        for e in range(4):
                            if m + e < M:
                                y[at + e] = out[e]

    kernel = apconv if conv else apmm
    kind = out if OUT_PACK else ("f32" if OUT_FLOAT else "i32")
    if OUT_PACK:
        kind += f"_{'usb'[OUT_ENC]}{OUT_BITS}" + (f"_t{LEVELS}" if LEVELS else "")
        kind += (f"_res{'usb'[RES_ENC]}{RES_BITS}" if RES_BITS else "") + ("_w" if WHOLE_ROWS else "") + ("_bytes" if OUT_BYTES else "")
    tile = dataclasses.replace(config, split_k=1).short() + ("z" if SPLIT else "")  # (z: split K, any share count)
    kernel.__name__ = f"{'apconv' if conv else 'apmm'}_w{p}a{q}_{tile}_{kind}"
    kernel.__qualname__ = kernel.__name__
    if config.min_blocks and not SIMULATOR:  # (the simulator's jit takes no launch bounds)
        return cuda.jit(kernel, launch_bounds=(THREADS, config.min_blocks))
    return cuda.jit(kernel)
