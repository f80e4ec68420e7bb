"""Tile configurations for APMM: a cost model to rank them, a small autotuner, a disk cache.

The model (cycles on one SM, summed over the blocks it runs)::

    mma:      pg*q*mt*nt mma per warp per k-step at ~0.67 m16n8k256 per clock per SM
    bytes:    (pg*BLOCK_M + q*BLOCK_N) * 32 bytes per k-step from L2 at ~24 bytes per clock per SM
    floor:    ~150 clocks of pipeline latency per stage, hidden by other resident blocks
    barrier:  ~60 idle clocks per stage when a block is alone on its SM
    epilogue: the int32 tile's bytes, at DRAM speed when alone, mostly hidden when not

ranks candidates; ``autotune`` times the best few on the GPU and remembers the
winner in a JSON file (``$APNUMBA_CACHE_DIR`` or ``~/.cache/apnumba``), keyed by
the card, the precisions and the shape, so a second run does not tune again.
"""

import dataclasses
import json
import math
import os
from pathlib import Path
import threading

from .kernels.apmm import MAX_THREADS, WGMMA_N, TileConfig

SMS = 132
MMA_PER_CLOCK = 0.67
L2_BYTES_PER_CLOCK = 24.0
PIPELINE_FLOOR = 150.0
BARRIER_IDLE = 60.0
STORE_BYTES_PER_CLOCK = (13.0, 40.0)  # output bytes per clock per SM: alone on the SM, overlapped
MAX_MMA_PER_WARP = 32  # 128 accumulator registers
REGISTERS_PER_SM = 65536
SHARED_PER_SM = 227 * 1024
MAX_SHARED_PER_BLOCK = 227 * 1024
WARP_LAYOUTS = ((2, 2, 1), (4, 2, 1), (2, 4, 1), (2, 1, 1), (1, 2, 1), (1, 1, 1), (1, 1, 2), (1, 1, 4), (2, 1, 2), (1, 2, 2), (4, 1, 1), (1, 4, 1))


def _divisors(p):
    return [d for d in range(p, 0, -1) if p % d == 0]


MAX_REGISTERS = 248  # above this ptxas starts to spill


def registers_estimate(config, p, q):
    """Registers per thread, fitted to ptxas on sm_90 (32 mma per warp: 203; two k-steps a stage: 239;
    several plane passes: 238)."""
    regs = 5.25 * config.mma_per_step(p, q) + 38
    regs += 32 if config.passes(p) > 1 else 0
    regs += 33 if config.steps > config.warps_k else 0
    return int(regs)


def blocks_per_sm(config, p, q):
    if registers_estimate(config, p, q) > MAX_REGISTERS:
        return 0
    regs = registers_estimate(config, p, q) * config.threads
    by_regs = REGISTERS_PER_SM // max(regs, 1)
    by_smem = SHARED_PER_SM // max(config.shared_bytes(p, q), 1)
    by_threads = 2048 // config.threads
    return max(0, min(by_regs, by_smem, by_threads, 32))


def estimate_cycles(config, p, q, M, N, K):
    """Modelled cycles for the whole product (lower is better); inf if the config cannot run."""
    bps = blocks_per_sm(config, p, q)
    if bps == 0 or config.shared_bytes(p, q) > MAX_SHARED_PER_BLOCK:
        return math.inf
    blocks = config.blocks(M, N)
    rounds = math.ceil(blocks / SMS)  # blocks each SM runs, one after another or side by side
    k_tiles = math.ceil(math.ceil(K / 256) / config.steps) * config.passes(p)
    mma = config.mma_per_step(p, q) * config.warps_m * config.warps_n * config.steps
    bytes_ = (config.group(p) * config.block_m + q * config.block_n) * 32 * config.steps
    # L2 serves whole 128-byte lines best: a row's stage is 32 bytes per k-step (measured: 32-byte
    # pieces reach about half the rate of full lines).
    l2_rate = L2_BYTES_PER_CLOCK * (0.5 + 0.5 * min(1.0, config.steps / 4))
    busy = rounds * (max(mma / MMA_PER_CLOCK, bytes_ / l2_rate) + (BARRIER_IDLE if bps == 1 else 0))
    latency = math.ceil(blocks / (SMS * bps)) * PIPELINE_FLOOR
    epilogue = rounds * config.block_m * config.block_n * 4 / STORE_BYTES_PER_CLOCK[bps > 1]
    return k_tiles * max(busy, latency) + epilogue


def candidates(p, q, M, N, K, limit=4, three_m_tiles=False):
    """The ``limit`` best-ranked tile configurations for this product, best first.

    ``three_m_tiles``: also warps of three m16 tiles where M is a multiple of 48 and not of 128 (96-row
    tiles for M = 96 or 192; measured for convolutions, which ask for them)."""
    m_cap = max(1, 2 ** math.ceil(math.log2(math.ceil(M / 16))))
    n_cap = max(1, 2 ** math.ceil(math.log2(math.ceil(N / 8))))
    # Three m16 tiles a warp where power-of-two tiles would leave rows idle: M = 96 (VGG's first conv)
    # or 192 (AlexNet's second) in 96-row tiles (VGG's first conv at batch 8 and 256, H100: -17%).
    m_tiles = (1, 2, 3, 4) if three_m_tiles and M % 48 == 0 and M % 128 else (1, 2, 4)
    ranked = []
    for pg in _divisors(p):
        for mt in m_tiles:
            for nt in (1, 2, 4, 8):
                if mt > m_cap or nt > n_cap or pg * q * mt * nt > MAX_MMA_PER_WARP:
                    continue
                for wm, wn, wk in WARP_LAYOUTS:
                    if 32 * wm * wn * wk > MAX_THREADS:
                        continue
                    if wm * mt > m_cap or wn * nt > n_cap:
                        continue
                    for steps in (wk, 2 * wk, 4 * wk):
                        for stages in (4, 3):
                            cfg = TileConfig(wm, wn, mt, nt, stages, 0 if pg == p else pg, wk, steps if steps != wk else 0)
                            cost = estimate_cycles(cfg, p, q, M, N, K)
                            if math.isfinite(cost):
                                # Ties: more mma per warp (latency hiding), then fewer threads.
                                ranked.append((cost, -cfg.mma_per_step(p, q), cfg.threads, cfg.short(), cfg))
                                break
    ranked.sort(key=lambda r: r[:4])
    # Diversity for the autotuner: the best of each tile shape, and the other stage depth of the best.
    chosen, shapes = [], set()
    for *_, cfg in ranked:
        shape = (cfg.block_m, cfg.block_n, cfg.threads, cfg.plane_group)
        if shape not in shapes:
            shapes.add(shape)
            chosen.append(cfg)
    if chosen:
        best = chosen[0]
        twin = next((c for *_, c in ranked if c.short() != best.short() and
                     (c.block_m, c.block_n, c.threads, c.plane_group) == (best.block_m, best.block_n, best.threads, best.plane_group)), None)
        if twin is not None:
            chosen.insert(1, twin)
    return chosen[:limit]


def default_config(p, q, M, N, K):
    return candidates(p, q, M, N, K, limit=1)[0]


WGMMA_MIN_WAVES = 8  # measured where blocks come in many waves (8192^3: 10-40); the autotuner times them anywhere
WGMMA_MIN_K = 4096


def hopper_config(p, q, M, N, K):
    """On sm_90, large products run on wgmma tiles of three warpgroups (two where the weight planes take
    several passes).  H100, 8192^3, against the mma.sync tiles in the same run: w1a1 42.7 -> 55.9%,
    w1a2 50.1 -> 73.1%, w2a2 52.9 -> 75.6%, w1a4 53.2 -> 78.9% of the mma.sync peak.  None where the
    mma.sync tiles stay: fewer than WGMMA_MIN_WAVES blocks per SM, or K below WGMMA_MIN_K (not measured).

    One-pass tiles (one block per SM, 192 x 256 outputs) also stagger their start (STAGGER_US) and stream
    their output past L2: a wave's blocks otherwise store their tiles at the same moment, at DRAM speed, while
    no SM multiplies.  H100, same run: w1a1 8192^3 227.4 -> 195.5 us, K = 4096 171.3 -> 137.9, K = 16384
    310.1 -> 300.2; w1a2 339.5 -> 317.7; w2a2, w1a4 within 1.5%; two-pass tiles (w4a4, w8a8) gain nothing.

    Two weight planes in one pass (p = 2) run persistent tiles of two warpgroups instead (128 x q * block_n
    products a k-step, blocks walking the tiles, the next tile's fill under the stores - TileConfig.persistent).
    H100, 8192^3, same run, against the staggered three-warpgroup tile: w2a1 356 -> 311 us, w2a2 660 -> 594,
    w2a4 1,296 -> 1,082; w2a2 4096 x 4096 x 8192 178 -> 159, 8192^2 x 4096 446 -> 399.  Not for one weight
    plane: w1a1 193 -> 230, w1a2 315 -> 350, w1a3 562 -> 664 (and the three-warpgroup tiles persistent lose
    more: their stores straight from the fragments take 8 rows x 32 bytes a warp instruction)."""
    cfg = wgmma_config(p, q, 3, 2)
    if cfg is not None and cfg.passes(p) > 1:  # several plane passes: three warpgroups would spill
        cfg = wgmma_config(p, q, 2, 2)
    elif cfg is not None and p == 2:
        cfg = dataclasses.replace(wgmma_config(p, q, 2, 2), persistent=True, stream_out=True)
    elif cfg is not None:
        cfg = dataclasses.replace(cfg, stagger_us=STAGGER_US, stream_out=True)
    if cfg is None or K < WGMMA_MIN_K:
        return None
    return cfg if cfg.blocks(M, N) >= WGMMA_MIN_WAVES * SMS else None


# Half the SMs start this late: about the time a wave's output stores take (H100, w1a1 8192^3: 4 us gains
# nothing, 7-10 us the most, 13 us little; at K = 4096 6 us gains, 9 us little).
STAGGER_US = 7


WGMMA_CONV_MIN_WAVES = 4  # measured at batch 256 only (ResNet-18's 3x3 layers: 5-200 blocks per SM)


def hopper_conv_config(p, q, M, N, K):
    """On sm_90, convolutions with many blocks run on wgmma tiles of 64 output pixels and 128 weight rows
    a stage (two warpgroups of one weight plane, or one of two planes; one where M <= 64), four stages of
    one k-step.  H100, ResNet-18's 3x3 layers at batch 256 with the fused epilogue, against the mma.sync
    tiles in the same run: w1a2 4-13% and w2a2 7-19% less time (their K is 9-36 k-steps: the pipeline
    fill and the epilogue weigh as much as the products); the whole network 4,470 -> 4,239 us.  None below
    WGMMA_CONV_MIN_WAVES blocks per SM, for one k-step (K <= 256: the 1x1 downsamples were 1-7% slower),
    or where the weight planes take several passes (w4a4, w8a8: not measured)."""
    group = 2 if p % 2 == 0 else 1
    warpgroups = 1 if group == 2 or M <= 64 else 2
    cfg = wgmma_config(p, q, warpgroups, 1, columns=min(256, 64 * group * q), max_stages=4)
    if cfg is None or cfg.passes(p) > 1 or K <= 256 or cfg.blocks(M, N) < WGMMA_CONV_MIN_WAVES * SMS:
        return None
    if group == 2:  # registers for three blocks an SM (168), stated as launch bounds: without them an int32 /
        cfg = dataclasses.replace(cfg, min_blocks=3)  # float32 output's tile took 184 (two blocks) in session 15
    return cfg


SPLIT_MIN_K_TILES = 12  # k-tiles (of 4 k-steps) at least, so each of two shares keeps >= 6


def hopper_split_conv_config(p, q, M, N, K):
    """On sm_90, a convolution whose int32 / float32 output has too few tiles for the SMs and a long K: wgmma
    tiles of 128 weight rows x 64 pixels, four k-steps a stage, K split over two blocks (``split_k``) where
    that makes a half to one wave.  H100, the APNN-TC sweep (batch 1, 16x16, 3x3), against the mma.sync
    default in the same run: C = K = 1536 w1a2 14.4 -> 12.9 us, w2a2 20.9 -> 16.4; C = K = 2048 w1a2 16.8 ->
    14.4, w2a2 25.3 -> 18.9.  None elsewhere: at C = K = 1024 (32 tiles, 9 k-tiles) and 768 the split was
    slower than the default, on the packed outputs of batch-8 layers (<= 5 k-tiles) 1.3-1.8x slower (a
    block's prologue and epilogue cost more than the k-tiles it saves), and with several plane passes."""
    group = 2 if p % 2 == 0 else 1
    cfg = wgmma_config(p, q, 2, 4, columns=min(256, 64 * group * q), max_stages=4)
    if cfg is None or cfg.passes(p) > 1 or cfg.block_n != 64:
        return None
    tiles, k_tiles = cfg.blocks(M, N), math.ceil(math.ceil(K / 256) / cfg.steps)
    if not (SMS <= 4 * tiles and 2 * tiles <= SMS) or k_tiles < SPLIT_MIN_K_TILES:
        return None
    return dataclasses.replace(cfg, split_k=2)


def wgmma_config(p, q, warpgroups=2, steps=2, columns=256, max_stages=8):
    """The warpgroup (sm_90a wgmma) tile for w{p}a{q}: ``warpgroups`` x 64 rows, at most two weight planes
    a pass, as many columns as ``columns`` / 2 accumulator registers hold (plane group x q x block_n =
    columns), the deepest ring (at most ``max_stages``) of ``steps``-k-step stages that fits in shared memory;
    None where no such tile exists."""
    group = 2 if p % 2 == 0 else 1
    # q * block_n is the product's n: a wgmma shape (w2a3: 120 is none, 96 is)
    block_n = max((n // q for n in WGMMA_N if n % (8 * q) == 0 and group * n <= columns), default=0)
    if block_n < 8:
        return None
    for stages in range(max_stages, 2, -1):
        cfg = TileConfig(4 * warpgroups, 1, 1, block_n // 8, stages, 0 if group == p else group, 1,
                         0 if steps == 1 else steps, min_blocks=1 if warpgroups > 2 else 0, wgmma=True)
        if cfg.shared_bytes(p, q) <= MAX_SHARED_PER_BLOCK:
            return cfg
    return None


# ---- the on-disk cache of autotuned choices ------------------------------------------------

_lock = threading.Lock()


def cache_path():
    root = os.environ.get("APNUMBA_CACHE_DIR") or os.path.join(Path.home(), ".cache", "apnumba")
    return Path(root) / "apmm_tiles.json"


def cache_key(device, p, q, M, N, K, out_float, mma="b1"):
    return f"{device}|w{p}a{q}|{M}x{N}x{K}|{'f32' if out_float else 'i32'}" + ("" if mma == "b1" else f"|{mma}")


def load_cache():
    try:
        with open(cache_path()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def cached_config(key):
    entry = load_cache().get(key)
    if not entry:
        return None
    try:
        return TileConfig(**entry["config"])
    except (TypeError, ValueError, KeyError):
        return None


def store_config(key, config, timings):
    """Remember ``config`` for ``key``; written atomically so a crash cannot corrupt the cache."""
    with _lock:
        data = load_cache()
        data[key] = {"config": config.__dict__.copy(), "timings_us": timings}
        path = cache_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
