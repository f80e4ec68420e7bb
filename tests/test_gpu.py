"""On a GPU (skipped cleanly without one): intrinsics, packing and APMM at real sizes against the reference."""

import dataclasses
import itertools

import numpy as np
import pytest
from numba import cuda

from apnumba import reference as R
from apnumba.device import AccumulatorOverflowError
from apnumba.kernels.apmm import TileConfig
from apnumba.matmul import apmm, matmul, prepare_apmm
from apnumba.packed import PackedTensor
from apnumba.precision import Precision, quantize
from apnumba.device import gpu_available
from apnumba.kernels.ptx import SIMULATOR
from apnumba.tuning import candidates, default_config, hopper_config, wgmma_config
from tests.conftest import requires_gpu
from tests.helpers import (
    check_apmm, check_conv, check_conv_packed, check_image_conv, check_network, check_pack, check_pooling_and_add, check_tiles,
    precisions,
)

pytestmark = requires_gpu


@pytest.mark.parametrize("shape", ["m16n8k256", "m8n8k128"])
@pytest.mark.parametrize("op", ["and", "xor"])
def test_mma_tiles_at_scale(rng, shape, op):
    check_tiles(rng, shape, op, tiles=4096)


@pytest.mark.parametrize("prec", ["b1", "u1", "s1", "u2", "s3", "u4", "s8", "u8"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_pack_at_scale(rng, prec, dtype):
    check_pack(rng, 1000, 3000, Precision.parse(prec), dtype, zero_point=1 if prec.startswith("u") else 0,
               per_row_scale=prec.endswith("4"))


def test_pack_shapes_not_multiple_of_anything(rng):
    for rows, K in [(1, 1), (7, 33), (129, 257), (3, 1000)]:
        check_pack(rng, rows, K, Precision.parse("s2"))


def test_pack_more_rows_than_a_grid_dimension_holds(rng):
    # 100,352 rows = a batch of two 224x224 images: past the 65,535 blocks of a grid's y (codes() once failed).
    check_pack(rng, 2 * 224 * 224, 40, Precision.parse("u2"))


# Every p, q in 1..8 crossed with every encoding pair, at a modest ragged size, on the tile the
# library picks for that size and on the tile it picks for 8192^3 (the big kernels).
BIT_PAIRS = list(itertools.product(range(1, 9), repeat=2))


@pytest.mark.parametrize("p,q", BIT_PAIRS)
def test_apmm_every_precision_and_encoding(rng, p, q):
    M, N, K = 150, 97, 1000
    for tile in (default_config(p, q, M, N, K), default_config(p, q, 8192, 8192, 8192)):
        for pw, px in itertools.product(precisions(p), precisions(q)):
            check_apmm(rng, pw, px, M, N, K, tile, w_extreme=True)


RAGGED = [1, 7, 33, 129, 1000]


@pytest.mark.parametrize("bits", ["b1u2", "s2u2", "b1b1", "u1s4", "s8u8"])
def test_apmm_ragged_shapes(rng, bits):
    pw, px = Precision.parse(bits[:2]), Precision.parse(bits[2:])
    for M, N, K in itertools.product(RAGGED, RAGGED, [1, 33, 257, 1000]):
        check_apmm(rng, pw, px, M, N, K)


@pytest.mark.parametrize("p,q", [(1, 2), (2, 2), (1, 4), (8, 8)])
def test_apmm_every_candidate_tile(rng, p, q):
    """The autotuner may pick any candidate: each must be exact (big, small and K-split shapes)."""
    for M, N, K in [(512, 512, 2048), (64, 1024, 1024), (1000, 8, 4096)]:
        for cfg in candidates(p, q, M, N, K):
            check_apmm(rng, precisions(p)[0], precisions(q)[-1], M + 3, N + 5, K - 9, cfg)


@pytest.mark.parametrize("layout", ["mn", "nm"])
@pytest.mark.parametrize("bits", ["b1u2", "s2s2", "u4b1"])
def test_apmm_float_epilogue_and_layouts(rng, layout, bits):
    check_apmm(rng, Precision.parse(bits[:2]), Precision.parse(bits[2:]), 300, 200, 1500, None, True, layout)


def test_apmm_zero_points(rng):
    check_apmm(rng, Precision.parse("u4"), Precision.parse("u3"), 100, 60, 900, zw=9, zx=3)


def test_apmm_big_k_close_to_the_int32_limit(rng):
    # K * 255 * 255 just under 2^31: the accumulator must not wrap anywhere on the way.
    K = 33025
    pw, px = Precision.parse("u8"), Precision.parse("u8")
    w = np.full((20, K), 255)
    x = np.full((18, K), 255)
    x[1::2] = R.random_codes(rng, (9, K), px)
    y = apmm(PackedTensor.from_codes(w, pw), PackedTensor.from_codes(x, px)).copy_to_host()
    assert (y == R.matmul_int(w, x)).all()
    with pytest.raises(AccumulatorOverflowError):
        apmm(PackedTensor.from_codes(w[:, :1].repeat(K + 1, 1), pw), PackedTensor.from_codes(x[:, :1].repeat(K + 1, 1), px))


# Byte packing: the same kernel on the int8 mma.  Every precision is held as int8 / uint8 values.
ALL_PRECISIONS = [Precision(1, "binary")] + [Precision(b, e) for b in range(1, 9) for e in ("unsigned", "signed")]


@pytest.mark.parametrize("pw", ALL_PRECISIONS, ids=str)
def test_apmm_bytes_every_precision(rng, pw):
    for px in ALL_PRECISIONS:
        for tile in (None, default_config(1, 1, 8192, 8192, 8192)):
            check_apmm(rng, pw, px, 150, 97, 1000, tile, w_extreme=True, packing="bytes")


def test_apmm_bytes_ragged_shapes_and_zero_points(rng):
    pw, px = Precision.parse("s8"), Precision.parse("u8")
    for M, N, K in itertools.product(RAGGED, RAGGED, [1, 31, 33, 257]):
        check_apmm(rng, pw, px, M, N, K, packing="bytes")
    check_apmm(rng, Precision.parse("u8"), Precision.parse("u8"), 300, 77, 3000, zw=100, zx=3, packing="bytes")
    for cfg in [TileConfig(1, 1, 1, 1, 2), TileConfig(2, 2, 1, 1, 4, 0, 2), TileConfig(2, 4, 2, 2, 4, 0, 1, 4)]:
        check_apmm(rng, pw, px, 300, 77, 3000, cfg, out_float=True, packing="bytes")
    w = PackedTensor.from_codes(np.zeros((4, 100), int), "s8", packing="bytes")
    with pytest.raises(ValueError, match="packings differ"):
        apmm(w, PackedTensor.from_codes(np.zeros((3, 100), int), "u2"))


@pytest.mark.parametrize("prec", ["s8", "u8", "u3", "b1"])
def test_pack_bytes_at_scale(rng, prec):
    check_pack(rng, 1000, 3000, Precision.parse(prec), zero_point=5 if prec == "u8" else 0, per_row_scale=True,
               packing="bytes")
    check_pack(rng, 2 * 224 * 224, 27, Precision.parse(prec), np.float16, packing="bytes")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_image_conv_at_scale(rng, layout):
    """The first layers as networks run them: the image's bytes (one word a pixel) read directly by the
    convolution, one word a tap - ResNet-18's 7x7/2 stem, AlexNet's 11x11/4, VGG's 3x3 - and 6 channels
    (padded pixels); several tiles; a zero point."""
    for image, K, k, stride, padding, px, zx, cfg in (
            ((2, 224, 224, 3), 64, 7, 2, 3, "s8", 0, None), ((3, 227, 225, 3), 64, 11, 4, 2, "s8", 0, None),
            ((2, 64, 70, 3), 96, 3, 1, 1, "u8", 9, None), ((2, 40, 33, 6), 32, 5, 2, 2, "s8", 0, None),
            ((2, 30, 31, 3), 64, 7, 2, 3, "s8", 0, TileConfig(1, 1, 1, 2, 4, 0, 2, 4)),
            ((2, 30, 31, 3), 64, 7, 2, 3, "s8", 0, TileConfig(2, 2, 2, 4, 3))):
        check_image_conv(rng, image, K, k, stride, padding, px, zx, layout=layout, config=cfg)


def test_apconv_bytes_geometries(rng):
    for image, K, k, stride, padding in CONV_GEOMETRY[:6]:
        check_conv(rng, Precision.parse("u8"), Precision.parse("s8"), image, K, k, stride, padding, zx=7, packing="bytes")


def _sm90():
    from apnumba.device import compute_capability
    return compute_capability() == (9, 0)


requires_sm90 = pytest.mark.skipif(not gpu_available() or SIMULATOR or not _sm90(), reason="wgmma tiles need an sm_90 GPU")
WGMMA_BITS = [(1, 1), (1, 2), (2, 2), (1, 4), (4, 4), (8, 8), (3, 5), (2, 1), (2, 3)]


@requires_sm90
@pytest.mark.parametrize("p,q", WGMMA_BITS)
def test_apmm_wgmma_every_encoding(rng, p, q):
    """The warpgroup tiles (the default on an H100 for large products, and the autotuner's other one):
    exact for every encoding pair, with the extreme values, the float epilogue and the transposed output."""
    for cfg in (hopper_config(p, q, 8192, 8192, 8192), wgmma_config(p, q, 2, 4)):
        for pw, px in itertools.product(precisions(p), precisions(q)):
            check_apmm(rng, pw, px, 150, 97, 1000, cfg, w_extreme=True)
        check_apmm(rng, precisions(p)[-1], precisions(q)[0], 300, 200, 1500, cfg, True, "nm")


@requires_sm90
def test_apmm_wgmma_ragged_shapes_and_the_default(rng):
    pw, px = Precision.parse("b1"), Precision.parse("u2")
    for cfg in (wgmma_config(1, 2, 3, 2), wgmma_config(1, 2, 2, 1)):
        for M, N, K in itertools.product(RAGGED, RAGGED, [1, 33, 257, 1000]):
            check_apmm(rng, pw, px, M, N, K, cfg)
    # A product large enough for the default to be a wgmma tile equals the mma.sync tile's result.
    M, N, K = 8192, 4096, 4100
    assert hopper_config(1, 2, M, N, K) is not None and hopper_config(1, 2, 64, 4096, K) is None
    W = PackedTensor.from_codes(R.random_codes(rng, (M, K), pw), pw)
    X = PackedTensor.from_codes(R.random_codes(rng, (N, K), px), px)
    wg = apmm(W, X)
    assert np.array_equal(apmm(W, X, config=default_config(1, 2, M, N, K)).copy_to_host(), wg.copy_to_host())
    assert prepare_apmm(W, X).config.wgmma and prepare_apmm(W, X).config.stagger_us  # (2,752 blocks: odd ones of the first wave start late)


@requires_sm90
@pytest.mark.parametrize("p,q", [(1, 1), (1, 2), (2, 2), (1, 4), (2, 1)])
def test_apmm_persistent_tiles(rng, monkeypatch, p, q):
    """Persistent wgmma tiles: seven blocks walk 36 or 48 tiles each problem (ragged both ways), whole tiles
    stored straight from the accumulators, the others through the shared tile - every encoding pair with the
    extreme values, the float epilogue, binary activations (column terms), rows of odd length, the
    transposed output: each route of the epilogue."""
    from apnumba.kernels.launch import CompiledKernel

    monkeypatch.setattr(CompiledKernel, "resident_blocks", lambda self, threads: 7)
    cfg = dataclasses.replace(hopper_config(p, q, 8192, 8192, 8192), persistent=True)
    M, N, K = 1000, 6 * cfg.block_n - 100, 1000  # 6 (or 8) x 6 tiles, ragged
    for pw, px in itertools.product(precisions(p), precisions(q)):
        check_apmm(rng, pw, px, M, N, K, cfg, w_extreme=True)
    check_apmm(rng, precisions(p)[-1], precisions(q)[0], M, N, K, cfg, out_float=True)
    check_apmm(rng, precisions(p)[0], precisions(q)[-1], M, N + 1, K, cfg, out_float=True)  # rows of odd length
    check_apmm(rng, precisions(p)[0], precisions(q)[0], M, N, K, cfg, layout="nm")
    assert prepare_apmm(PackedTensor.from_codes(np.zeros((M, K), int), precisions(p)[-1]),  # (not binary: 0 is no +-1 code)
                        PackedTensor.from_codes(np.zeros((N, K), int), precisions(q)[-1]), config=cfg).grid == (7, 1)


def test_apmm_tile_configs_by_hand(rng):
    for cfg in [TileConfig(1, 1, 1, 1, 2), TileConfig(4, 2, 4, 8, 4), TileConfig(1, 1, 2, 3, 3, 0, 4), TileConfig(2, 2, 1, 1, 4, 2, 2),
                TileConfig(2, 4, 2, 2, 4, 0, 1, 4, raster=3, stream_out=True), TileConfig(1, 1, 1, 1, 2, raster=7)]:
        check_apmm(rng, Precision.parse("s4"), Precision.parse("u2"), 300, 77, 3000, cfg)


def test_apmm_rejects_mismatched_operands():
    w = PackedTensor.from_codes(np.zeros((4, 100), int), "u2")
    x = PackedTensor.from_codes(np.zeros((3, 90), int), "u2")
    with pytest.raises(ValueError, match="reduction lengths differ"):
        apmm(w, x)
    with pytest.raises(TypeError, match="x: expected a PackedTensor"):
        apmm(w, np.zeros((3, 100)))
    x = PackedTensor.from_codes(np.zeros((3, 100), int), "u2")
    with pytest.raises(ValueError, match=r"out: expected int32 \(4, 3\)"):
        apmm(w, x, out=cuda.device_array((3, 4), np.int32))
    with pytest.raises(ValueError, match="scale: expected 4 values"):
        apmm(w, x, scale=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="layout"):
        apmm(w, x, layout="km")


def test_matmul_convenience_from_floats_and_codes(rng):
    w = rng.standard_normal((64, 500)).astype(np.float32)
    x = np.abs(rng.standard_normal((40, 500))).astype(np.float32)
    got = matmul(w, x, "s4", "u2", w_scale=0.4, x_scale=0.7)
    expect = R.matmul_int(quantize(w, "s4", 0.4), quantize(x, "u2", 0.7))
    assert (got == expect).all()
    codes = R.random_codes(rng, (10, 300), Precision.parse("b1"))
    xc = R.random_codes(rng, (9, 300), Precision.parse("u3"))
    assert (matmul(codes, xc, "b1", "u3") == R.matmul_int(codes, xc)).all()


# ---------------------------------------------------------------- convolution (issue 4)

CONV_GEOMETRY = [  # (image N,H,W,C), K, kernel, stride, padding
    ((2, 14, 14, 64), 64, 3, 1, 1), ((2, 15, 13, 70), 40, 3, 2, 1), ((1, 16, 16, 33), 96, 1, 1, 0),
    ((2, 9, 9, 20), 32, 5, 1, 2), ((1, 23, 23, 3), 64, 7, 2, 3), ((1, 47, 47, 3), 48, 11, 4, 2),
    ((3, 8, 8, 300), 16, 3, 1, 0), ((1, 8, 8, 128), 128, 1, 2, 0),
]


@pytest.mark.parametrize("image,K,k,stride,padding", CONV_GEOMETRY, ids=[f"{g[2]}x{g[2]}s{g[3]}p{g[4]}c{g[0][3]}" for g in CONV_GEOMETRY])
def test_apconv_geometries(rng, image, K, k, stride, padding):
    for px, pw in [("u2", "b1"), ("b1", "b1"), ("s2", "s2")]:
        check_conv(rng, Precision.parse(px), Precision.parse(pw), image, K, k, stride, padding)


@pytest.mark.parametrize("p,q", [(1, 1), (1, 2), (2, 2), (1, 4), (4, 4), (8, 8), (3, 5)])
def test_apconv_every_encoding_pair(rng, p, q):
    for pw, px in itertools.product(precisions(p), precisions(q)):
        check_conv(rng, px, pw, (2, 10, 11, 45), 32, 3, 1, 1, out_float=pw.encoding.value == "signed")


def test_apconv_zero_points(rng):
    check_conv(rng, Precision.parse("u4"), Precision.parse("u3"), (2, 12, 12, 50), 48, 3, 2, 1, zx=5, zw=2)


@requires_sm90
@pytest.mark.parametrize("p,q", [(1, 1), (1, 2), (2, 2), (1, 4), (4, 4), (8, 8), (3, 5), (2, 3)])
def test_apconv_wgmma_every_encoding(rng, p, q):
    """The convolution on warpgroup tiles (one and two warpgroups, one and two k-steps a stage): every
    encoding pair, with a border, ragged channels (45: taps of two words, two a k-step) and a stride
    (w2a3: a product of n = 96, where 120 would be no wgmma shape)."""
    for cfg in (wgmma_config(p, q, 2, 1), wgmma_config(p, q, 1, 2)):
        for pw, px in itertools.product(precisions(p), precisions(q)):
            check_conv(rng, px, pw, (2, 10, 11, 45), 70, 3, 1, 1, cfg, out_float=pw.encoding.value == "signed")
        check_conv(rng, precisions(q)[-1], precisions(p)[0], (3, 15, 13, 300), 130, 3, 2, 1, cfg)


@requires_sm90
@pytest.mark.parametrize("image,K,k,stride,padding", CONV_GEOMETRY, ids=[f"{g[2]}x{g[2]}s{g[3]}p{g[4]}c{g[0][3]}" for g in CONV_GEOMETRY])
def test_apconv_wgmma_geometries(rng, image, K, k, stride, padding):
    """Every kernel size, stride and padding of the mma.sync tests (one-word taps of <= 32 channels too)
    on the warpgroup tiles the H100 picks for convolutions."""
    for px, pw in [("u2", "b1"), ("s2", "s2")]:
        for cfg in (wgmma_config(1 if pw == "b1" else 2, 2, 2, 1), wgmma_config(1 if pw == "b1" else 2, 2, 3, 1)):
            check_conv(rng, Precision.parse(px), Precision.parse(pw), image, K, k, stride, padding, cfg)


@requires_sm90
@pytest.mark.parametrize("out,residual,pool", [("u2", None, None), ("u2", "u2", None), ("s4", "s3", None), ("b1", None, "max"),
                                               ("u3", None, "avg"), ("u8", None, None)])
def test_apconv_wgmma_fused_epilogue(rng, out, residual, pool):
    """The fused epilogue (thresholds, float32 with a residual, pooling) after warpgroup main loops: the same
    fold and tile, one block holding all channels of a pixel or several adding row sums."""
    for cfg in (wgmma_config(1, 2, 2, 1), wgmma_config(1, 2, 1, 1)):
        for (image, K, k, stride, padding) in [((2, 14, 14, 64), 64, 3, 1, 1), ((2, 15, 15, 40), 200, 3, 2, 1)]:
            check_conv_packed(rng, Precision.parse("u2"), Precision.parse("b1"), image, K, k, stride, padding,
                              Precision.parse(out), relu=out.startswith("u"), config=cfg, pool=pool,
                              residual_precision=residual and Precision.parse(residual))
        # +-1 activations: the weight-sum term at the border pixels (the column terms gathered in the main loop)
        check_conv_packed(rng, Precision.parse("b1"), Precision.parse("b1"), (2, 15, 13, 96), 128, 3, 1, 1,
                          Precision.parse(out), relu=out.startswith("u"), config=cfg, pool=pool, signs=True)


# Split K: blocks sum shares of the k-tiles, the last of a tile adds the others' partial tiles and runs the
# epilogue.  Ragged shares (36 k-steps: 9 four-step k-tiles over 2 shares -> 5 + 4, over 5 -> 2, 2, 2, 2, 1;
# 36 one-step k-tiles -> 8 x 4 + 4), int32, float32 and every fused epilogue, mma.sync and warpgroup tiles.
SPLIT_TILES = {"mma": TileConfig(2, 4, 2, 1, 4, stage_steps=4), "mma-step": TileConfig(2, 2, 1, 2, 3, plane_group=1),
               "wgmma": wgmma_config(1, 2, 2, 4, columns=128, max_stages=4)}


@pytest.mark.parametrize("tile", [pytest.param(t, marks=requires_sm90) if t == "wgmma" else t for t in SPLIT_TILES])
def test_apconv_split_k(rng, tile):
    for split in (2, 5):  # (one build serves every share count)
        cfg = dataclasses.replace(SPLIT_TILES[tile], split_k=split)
        check_conv(rng, Precision.parse("u2"), Precision.parse("b1"), (1, 16, 16, 1024), 200, 3, 1, 1, cfg)
        check_conv(rng, Precision.parse("s2"), Precision.parse("s2"), (2, 9, 7, 300), 70, 3, 2, 1, cfg, out_float=True)
        check_conv(rng, Precision.parse("b1"), Precision.parse("b1"), (1, 12, 12, 96), 64, 5, 1, 2, cfg)
        for out, res, pool in [("u2", None, None), ("s3", "u2", None), ("u2", None, "max"), ("u8", None, None)]:
            check_conv_packed(rng, Precision.parse("u2"), Precision.parse("b1"), (2, 10, 10, 600), 96, 3, 1, 1,
                              Precision.parse(out), relu=out != "s3", residual_precision=res and Precision.parse(res),
                              config=cfg, pool=pool, signs=True, out_packing="bytes" if out == "u8" else "bits")


@requires_sm90
def test_apconv_split_k_default_and_relaunch(rng):
    """Where the H100 default splits K (an int32 output of few tiles and a long K: APNN-TC's C = K = 2048),
    twice through one launch: equal to the reference both times, the counters zero after each."""
    from apnumba.conv import PackedConvWeight, prepare_apconv

    x = R.random_codes(rng, (1, 16, 16, 2048), "u2")
    w = R.random_codes(rng, (2048, 3, 3, 2048), "b1")
    expect = R.conv2d_int(x, w, 1, 1).astype(np.int32)
    out = cuda.device_array(expect.shape, np.int32)
    run = prepare_apconv(PackedTensor.from_codes(x, "u2"), PackedConvWeight.from_codes(w, "b1"), 1, 1, out=out)
    assert run.config.split_k == 2 and run.config.wgmma, run.config.short()
    for _ in range(2):
        out.copy_to_device(np.full(expect.shape, -123456789, np.int32))  # poisoned
        run()
        assert (out.copy_to_host() == expect).all()
        assert not run.split_count.copy_to_host().any()


@pytest.mark.parametrize("out,residual", [("u2", None), ("u2", "u2"), ("b1", None), ("s4", "s3"), ("u8", "b1")])
def test_apconv_fused_epilogue(rng, out, residual):
    for (image, K, k, stride, padding) in [((2, 14, 14, 64), 64, 3, 1, 1), ((1, 15, 15, 40), 72, 3, 2, 1)]:
        check_conv_packed(rng, Precision.parse("u2"), Precision.parse("b1"), image, K, k, stride, padding,
                          Precision.parse(out), relu=out.startswith("u"),
                          residual_precision=residual and Precision.parse(residual))


@pytest.mark.parametrize("out,pool,residual", [("u8", None, None), ("s8", "max", None), ("u3", None, "u2"), ("b1", None, None)])
def test_apconv_fused_epilogue_bytes_out(rng, out, pool, residual):
    """The epilogue writing code bytes for an int8 next layer: as the FC before an 8-bit last layer (1x1 over
    4096 features, several m-blocks), a conv with pooling or a residual, +-1 codes."""
    check_conv_packed(rng, Precision.parse("u2"), Precision.parse("b1"), (8, 1, 1, 4096), 1000, 1, 1, 0,
                      Precision.parse(out), relu=out.startswith("u"), out_packing="bytes")
    check_conv_packed(rng, Precision.parse("u2"), Precision.parse("b1"), (2, 14, 14, 64), 72, 3, 1, 1,
                      Precision.parse(out), relu=out.startswith("u"), pool=pool, signs=True, out_packing="bytes",
                      residual_precision=residual and Precision.parse(residual))


@pytest.mark.parametrize("pool", ["max", "avg"])
@pytest.mark.parametrize("out", ["u2", "s4", "b1"])
def test_apconv_fused_pooling(rng, pool, out):
    for (image, K, k, stride, padding) in [((2, 14, 14, 64), 64, 3, 1, 1), ((1, 15, 13, 40), 72, 3, 1, 1),
                                           ((2, 28, 28, 96), 256, 3, 1, 1)]:
        check_conv_packed(rng, Precision.parse("u2"), Precision.parse("b1"), image, K, k, stride, padding,
                          Precision.parse(out), relu=out != "s4", pool=pool)


def test_two_chained_layers(rng):
    """pack -> conv -> fused epilogue (packed) -> conv -> float out, against the reference chain."""
    from apnumba.conv import PackedConvWeight, apconv
    from apnumba.reference import conv2d_int, requantize

    xf = rng.standard_normal((2, 12, 12, 48)).astype(np.float32)
    pa, pw = Precision.parse("u2"), Precision.parse("b1")
    x = PackedTensor.from_float(xf, pa, scale=0.5)
    w1 = R.random_codes(rng, (64, 3, 3, 48), pw)
    w2 = R.random_codes(rng, (32, 3, 3, 64), pw)
    s1 = rng.uniform(0.01, 0.05, 64).astype(np.float32)
    b1 = rng.uniform(-0.5, 0.5, 64).astype(np.float32)
    h = PackedTensor.empty((2 * 12 * 12, 64), pa)
    apconv(x, PackedConvWeight.from_codes(w1, pw), 1, 1, out=h, scale=s1, bias=b1, relu=True)
    s2 = rng.uniform(0.5, 1.5, 32).astype(np.float32)
    b2 = rng.uniform(-1, 1, 32).astype(np.float32)
    y = apconv(h, PackedConvWeight.from_codes(w2, pw), 1, 1, scale=s2, bias=b2).copy_to_host()

    xq = quantize(xf.reshape(-1, 48), pa, 0.5).reshape(2, 12, 12, 48)
    hq = requantize(conv2d_int(xq, w1, 1, 1).reshape(-1, 64), s1, b1, pa, 0, True).reshape(2, 12, 12, 64)
    expect = conv2d_int(hq, w2, 1, 1).astype(np.int32).astype(np.float32) * s2 + b2
    assert (y == expect).all()


@pytest.mark.parametrize("prec,zp", [("u2", 0), ("u4", 3), ("s3", 0), ("b1", 0), ("s8", 0)])
def test_pooling_and_add_at_scale(rng, prec, zp):
    check_pooling_and_add(rng, (4, 28, 27, 100), Precision.parse(prec), zp)


# ---------------------------------------------------------------- networks (issue 5)

@pytest.mark.parametrize("bits", ["w1a2", "w2a2", "wb1a2"])
@pytest.mark.parametrize("which", ["tiny_vgg", "tiny_resnet"])
def test_toy_networks_equal_their_numpy_twin(rng, which, bits):
    from apnumba.layers import models

    size = 8 if which == "tiny_vgg" else 16
    check_network(rng, getattr(models, which)(bits), (2, 3, size, size), capture=True)


def test_toy_network_nhwc_input_and_apnn_convention(rng):
    from apnumba.layers.models import tiny_resnet

    check_network(rng, tiny_resnet("w2a2", apnn_convention=True), (2, 16, 16, 3), layout="NHWC")


@pytest.mark.parametrize("bits", ["w1a2", "w2a2", "wb1a2"])
@pytest.mark.parametrize("name", ["alexnet", "vgg", "resnet18"])
def test_model_suite_at_batch_2(rng, name, bits):
    from apnumba.layers.models import MODELS

    build, size = MODELS[name]
    check_network(rng, build(bits), (2, 3, size, size))


def test_network_rejects_bad_inputs():
    from apnumba.layers import Network
    from apnumba.layers.models import tiny_vgg
    from apnumba.layers.network import PlanError

    net = Network(tiny_vgg("w1a2"), (2, 3, 8, 8))
    with pytest.raises(ValueError, match="x: expected shape"):
        net.forward(np.zeros((2, 3, 8, 9), np.float32))
    with pytest.raises(TypeError, match="float32 or float16"):
        net.forward(np.zeros((2, 3, 8, 8), np.int32))
    with pytest.raises(PlanError, match="input channels"):
        Network(tiny_vgg("w1a2"), (2, 4, 8, 8))
    with pytest.raises(PlanError, match="GiB"):
        Network(tiny_vgg("w1a2"), (2**20, 3, 512, 512))


def test_layer_times_and_a_saved_model_run(rng, tmp_path):
    from apnumba.layers import Network, load, save
    from apnumba.layers.models import tiny_resnet, tiny_vgg

    model = tiny_vgg("w2a2")
    save(model, tmp_path / "m.npz")
    net = Network(load(tmp_path / "m.npz"), (2, 3, 8, 8))
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert (net.forward(x).copy_to_host() == Network(model, (2, 3, 8, 8)).reference(x)).all()
    times = net.layer_times(repeats=3)
    assert [name for name, _, _ in times] == [s.name for s in net.steps]
    assert all(us > 0 for _, us, _ in times)
    net = Network(tiny_resnet("w1a2"), (2, 3, 16, 16)).capture()  # a side-stream downsample, timed alone
    assert any(s.side for s in net.steps)
    times = {name.split(":")[-1]: us for name, us, _ in net.layer_times(repeats=3)}
    assert times.pop("Flatten") == 0.0 and all(us > 0 for us in times.values())  # a 1x1 flatten launches nothing
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    assert (net.forward(x).copy_to_host() == net.reference(x)).all()


# ---------------------------------------------------------------- imported torch models (issue 6)

def test_an_imported_torch_model_runs_exactly_on_the_gpu(rng):
    pytest.importorskip("torch")
    from apnumba.layers import Network
    from apnumba.layers.importer import compare, from_torch
    from tests.test_import import small_cnn, trained

    for w_bits, a_bits in ((1, 2), (2, 2)):
        model = trained(small_cnn(w_bits, a_bits))
        imported = from_torch(model)
        net = check_network(rng, imported, (8, 3, 11, 11), capture=True)  # GPU == numpy twin == CPU plan
        x = rng.standard_normal((8, 3, 11, 11)).astype(np.float32)
        report = compare(model.cuda(), imported, x)  # a torch model on the GPU: compared from a CPU copy
        assert all(s.differ == 0 for s in report.steps), report.table()
        assert report.predictions_agree == 8
        assert (net.forward(x).copy_to_host() == Network(imported, x.shape, device="cpu").forward(x)).all()
        assert from_torch(model).layers[0].weight.shape == imported.layers[0].weight.shape  # imports from the GPU


def test_digits_example_on_the_gpu():
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import digits

    assert digits.main(["--epochs", "3", "--device", "cuda"]) == 0
