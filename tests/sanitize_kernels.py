"""A representative set of kernel launches for compute-sanitizer (memcheck, racecheck, synccheck).

    compute-sanitizer --tool memcheck  python tests/sanitize_kernels.py
    compute-sanitizer --tool racecheck python tests/sanitize_kernels.py
    compute-sanitizer --tool racecheck python tests/sanitize_kernels.py wgmma   # the warpgroup tiles only
    compute-sanitizer --tool memcheck  python tests/sanitize_kernels.py split   # split-K convolutions only
    compute-sanitizer --tool racecheck python tests/sanitize_kernels.py persistent   # persistent APMM tiles only

Small problems (the tools are slow); every result is also checked against the reference.
Not collected by pytest (no test_ prefix).
"""

import sys

import numpy as np

from apnumba.kernels.apmm import TileConfig
from apnumba.precision import Precision
from apnumba.device import compute_capability
from apnumba.tuning import default_config, hopper_config, wgmma_config
from tests.helpers import check_apmm, check_conv, check_conv_packed, check_image_conv, check_pack, check_pooling_and_add


def wgmma_cases(rng):
    """The warpgroup (sm_90a) tiles: APMM (the H100's default for large products, a two-pass one) and
    convolutions (int32, the fused epilogue with a residual over several blocks, pooling)."""
    for pw, px, cfg in [("b1", "u2", hopper_config(1, 2, 8192, 8192, 8192)), ("s4", "u4", wgmma_config(4, 4, 2, 2))]:
        for M, N, K in [(130, 70, 1100), (5, 3, 40)]:
            check_apmm(rng, Precision.parse(pw), Precision.parse(px), M, N, K, cfg, out_float=pw == "s4")
        print(f"apmm {pw} {px} {cfg.short()}: clean run, exact", flush=True)
    check_conv(rng, Precision.parse("u2"), Precision.parse("b1"), (2, 9, 10, 40), 72, 3, 2, 1, wgmma_config(1, 2, 2, 1, 128, 4))
    check_conv_packed(rng, Precision.parse("u2"), Precision.parse("s2"), (1, 8, 8, 64), 200, 3, 1, 1,
                      Precision.parse("u2"), residual_precision=Precision.parse("s3"), config=wgmma_config(2, 2, 1, 1, 256, 4))
    check_conv_packed(rng, Precision.parse("u2"), Precision.parse("b1"), (2, 9, 11, 40), 64, 3, 1, 1,
                      Precision.parse("u2"), pool="max", config=wgmma_config(1, 2, 1, 1, 128, 4))
    print("apconv on warpgroup tiles: clean run, exact", flush=True)


def split_cases(rng):
    """Convolutions with K split over blocks (the workspace, the counters, the last block's reads): int32 on
    mma.sync and warpgroup tiles, a fused epilogue over several channel blocks, each launched twice."""
    import dataclasses

    for cfg in (TileConfig(2, 4, 2, 1, 4, stage_steps=4, split_k=3), TileConfig(2, 2, 1, 2, 3, split_k=5)) + (
            (dataclasses.replace(wgmma_config(1, 2, 2, 4, 128, 4), split_k=2),) if compute_capability() == (9, 0) else ()):
        for _ in range(2):
            check_conv(rng, Precision.parse("u2"), Precision.parse("b1"), (1, 8, 8, 600), 72, 3, 1, 1, cfg)
            check_conv_packed(rng, Precision.parse("u2"), Precision.parse("b1"), (1, 8, 8, 600), 96, 3, 1, 1,
                              Precision.parse("u2"), config=cfg, signs=True)
        print(f"apconv split {cfg.short()}: clean run, exact", flush=True)


def persistent_cases(rng):
    """Persistent APMM tiles (the H100's default for w2aX): three blocks walk the tiles - whole ones stored from
    the accumulators while the next tile's first stages land, ragged ones through the shared tile - int32 and
    float32, binary activations (column terms: the shared tile everywhere)."""
    from apnumba.kernels.launch import CompiledKernel

    CompiledKernel.resident_blocks = lambda self, threads: 3
    cfg = hopper_config(2, 2, 8192, 8192, 8192)
    for pw, px, M, N, out_float in [("s2", "u2", 256, 192, False), ("u2", "s2", 300, 200, True), ("s2", "b1", 256, 130, False)]:
        check_apmm(rng, Precision.parse(pw), Precision.parse(px), M, N, 1100, cfg, out_float=out_float)
    print(f"apmm persistent {cfg.short()}: clean run, exact", flush=True)


def main():
    rng = np.random.default_rng(7)
    if sys.argv[1:] in (["wgmma"], ["split"], ["persistent"]):
        {"wgmma": wgmma_cases, "split": split_cases, "persistent": persistent_cases}[sys.argv[1]](rng)
        print("all sanitizer cases match the reference")
        return
    check_pack(rng, 37, 300, Precision.parse("s3"))
    check_pack(rng, 5, 1000, Precision.parse("b1"), np.float16)
    cases = [
        ("b1", "u2", default_config(1, 2, 8192, 8192, 8192)),  # the big tile, 2 k-steps a stage
        ("s2", "u2", default_config(2, 2, 8192, 8192, 8192)),
        ("s8", "u8", default_config(8, 8, 8192, 8192, 8192)),  # two plane passes
        ("b1", "b1", default_config(1, 1, 8192, 8192, 8192)),
        ("b1", "u3", TileConfig(1, 1, 2, 1, 4, 0, 4, 8)),  # K split over 4 warps
        ("s4", "u2", TileConfig(1, 1, 1, 3, 2, 2)),  # odd n-tiles, plane groups
    ]
    for pw, px, cfg in cases:
        for M, N, K in [(130, 70, 1100), (5, 3, 40)]:
            check_apmm(rng, Precision.parse(pw), Precision.parse(px), M, N, K, cfg, out_float=pw == "s2")
    check_conv(rng, Precision.parse("b1"), Precision.parse("s2"), (2, 9, 10, 40), 48, 3, 2, 1)
    check_conv_packed(rng, Precision.parse("u2"), Precision.parse("b1"), (1, 8, 8, 64), 64, 3, 1, 1,
                      Precision.parse("u2"), residual_precision=Precision.parse("s3"))
    check_conv_packed(rng, Precision.parse("u2"), Precision.parse("b1"), (1, 8, 8, 64), 64, 3, 1, 1,
                      Precision.parse("s3"), signs=True)  # the integer-threshold epilogue
    for pool in ("max", "avg"):  # fused 2x2/2 pooling: window-ordered rows, odd sizes
        check_conv_packed(rng, Precision.parse("u2"), Precision.parse("s2"), (2, 9, 11, 40), 40, 3, 1, 1,
                          Precision.parse("u2"), pool=pool)
    check_conv_packed(rng, Precision.parse("u2"), Precision.parse("b1"), (1, 8, 8, 64), 200, 3, 1, 1,
                      Precision.parse("u2"), config=TileConfig(2, 2, 3, 2, 4))  # a row's last tile past its words
    if compute_capability() == (9, 0):
        wgmma_cases(rng)
    split_cases(rng)
    check_pooling_and_add(rng, (2, 6, 7, 40), Precision.parse("u2"), 1)
    # Byte packing: the int8 mma, the byte packers (rows; an image's pixels), a byte conv with the fused
    # epilogue storing whole rows' sums, and a stem reading the image's bytes one word a tap (several tiles
    # and the image's borders: each 4-byte copy in or zero-filled).
    check_apmm(rng, Precision.parse("s8"), Precision.parse("u8"), 130, 70, 1100, packing="bytes")
    check_pack(rng, 37, 300, Precision.parse("u8"), zero_point=3, packing="bytes")
    check_conv_packed(rng, Precision.parse("s8"), Precision.parse("s8"), (2, 6, 5, 147), 64, 1, 1, 0,
                      Precision.parse("u2"), packing="bytes")
    check_conv_packed(rng, Precision.parse("u2"), Precision.parse("b1"), (4, 1, 1, 600), 100, 1, 1, 0,
                      Precision.parse("u8"), out_packing="bytes")  # code bytes for an int8 next layer
    check_image_conv(rng, (2, 20, 18, 3), 64, 7, 2, 3)
    check_image_conv(rng, (1, 13, 12, 3), 32, 11, 4, 2, "u8", 5, layout="NHWC")
    print("all sanitizer cases match the reference")


if __name__ == "__main__":
    main()
