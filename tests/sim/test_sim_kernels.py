"""Kernels in numba's CUDA simulator, on tiny problems (run by tests/test_simulator.py in its own process)."""

import numpy as np
import pytest

from apnumba.kernels.apmm import TileConfig
from apnumba.precision import Precision

from tests.conftest import requires_simulator
from tests.helpers import (check_apmm, check_conv, check_conv_packed, check_image_conv, check_pack, check_pooling_and_add,
                           check_tiles)

pytestmark = requires_simulator


@pytest.mark.parametrize("shape", ["m16n8k256", "m8n8k128"])
@pytest.mark.parametrize("op", ["and", "xor"])
def test_mma_fallbacks_match_the_fragment_layout(rng, shape, op):
    check_tiles(rng, shape, op, tiles=2)


@pytest.mark.parametrize("prec", ["b1", "u1", "s1", "u3", "s8"])
def test_pack_and_unpack(rng, prec):
    check_pack(rng, 3, 40, Precision.parse(prec), zero_point=1 if prec == "u3" else 0, per_row_scale=True)


def test_pack_float16(rng):
    check_pack(rng, 2, 300, Precision.parse("s4"), dtype=np.float16)


# One-tile (or a few) problems through the full APMM kernel: pipeline, plane pairs, epilogue.
CASES = [
    ("u2", "u2", TileConfig(1, 1, 1, 2, 2), 13, 11, 300, False, "mn"),
    ("b1", "u2", TileConfig(1, 1, 1, 2, 3), 16, 16, 500, True, "nm"),  # +-1 weights: SX correction
    ("s3", "b1", TileConfig(1, 1, 1, 1, 2, 0, 2), 9, 5, 600, False, "mn"),  # K split over 2 warps
    ("s2", "s2", TileConfig(1, 1, 1, 3, 2, 1), 7, 20, 100, True, "mn"),  # 2 passes, odd n-tiles
    ("b1", "b1", TileConfig(2, 1, 1, 1, 2), 30, 8, 257, False, "mn"),
    ("u1", "s2", TileConfig(1, 1, 1, 2, 2, 0, 1, 4), 20, 9, 1300, False, "mn"),  # 4 k-steps a stage, ragged
    ("s2", "u1", TileConfig(1, 1, 1, 1, 3, 0, 2, 4), 11, 6, 700, True, "mn"),  # 2 k-groups x 2 steps each
    ("b1", "u2", TileConfig(1, 1, 1, 1, 2, raster=3, stream_out=True), 80, 20, 256, False, "mn"),  # grouped order
    ("s2", "u2", TileConfig(1, 1, 3, 1, 2), 100, 9, 300, True, "mn"),  # three m16 tiles a warp, a ragged last block
    ("u2", "b1", TileConfig(1, 1, 1, 1, 2, stagger_us=1), 40, 20, 300, False, "mn"),  # odd blocks start late
    # Persistent: two blocks walk the tiles (the simulator's resident_blocks), stores straight from the fragments.
    # Whole tiles of row-major outputs with rows of an even length and no column terms store from the fragments;
    # the others (ragged edges, odd rows, binary activations, transposed) through the shared tile.
    ("u2", "u2", TileConfig(1, 1, 1, 2, 3, persistent=True), 45, 38, 600, False, "mn"),  # 9 tiles, 4 whole
    ("b1", "s2", TileConfig(1, 1, 2, 1, 2, 0, 1, 2, raster=2, persistent=True), 70, 16, 900, True, "mn"),  # grouped
    ("u2", "u1", TileConfig(1, 1, 1, 2, 2, persistent=True), 32, 33, 300, True, "mn"),  # rows of odd length
    ("s2", "b1", TileConfig(1, 1, 1, 3, 2, persistent=True, stream_out=True, stagger_us=1), 33, 50, 300, True, "nm"),
]


@pytest.mark.parametrize("pw,px,cfg,M,N,K,out_float,layout", CASES, ids=[f"{c[0]}x{c[1]}-{c[2].short()}" for c in CASES])
def test_apmm_one_tile(rng, pw, px, cfg, M, N, K, out_float, layout):
    check_apmm(rng, Precision.parse(pw), Precision.parse(px), M, N, K, cfg, out_float, layout, w_extreme=True)


# Byte-packed operands through the same kernel on the int8 mma (any precision: values as int8 / uint8).
BYTE_CASES = [
    ("s8", "u8", TileConfig(1, 1, 1, 2, 2), 13, 11, 70, False),
    ("u8", "s8", TileConfig(1, 1, 1, 1, 2, 0, 2), 9, 5, 100, True),  # K split over 2 warps, ragged k-step
    ("b1", "u3", TileConfig(1, 1, 1, 2, 2), 16, 9, 33, False),
    ("s4", "s8", TileConfig(1, 1, 1, 1, 2, 0, 1, 2), 7, 8, 90, False),  # 2 k-steps a stage
]


@pytest.mark.parametrize("pw,px,cfg,M,N,K,out_float", BYTE_CASES, ids=[f"{c[0]}x{c[1]}-{c[2].short()}" for c in BYTE_CASES])
def test_apmm_bytes(rng, pw, px, cfg, M, N, K, out_float):
    check_apmm(rng, Precision.parse(pw), Precision.parse(px), M, N, K, cfg, out_float, w_extreme=True, packing="bytes")


def test_apmm_bytes_zero_points(rng):
    check_apmm(rng, Precision.parse("u8"), Precision.parse("u5"), 6, 9, 80, TileConfig(1, 1, 1, 2, 2), zw=100, zx=3,
               packing="bytes")


@pytest.mark.parametrize("prec", ["s8", "u8", "b1"])
def test_pack_bytes(rng, prec):
    check_pack(rng, 5, 37, Precision.parse(prec), zero_point=7 if prec == "u8" else 0, per_row_scale=True, packing="bytes")


def test_apconv_bytes(rng):
    """A byte-packed conv with borders and a zero point, and the first layer's case: 1x1 with the fused epilogue."""
    check_conv(rng, Precision.parse("u8"), Precision.parse("s8"), (1, 5, 4, 11), 16, 3, 1, 1,
               TileConfig(1, 1, 1, 2, 2), zx=5, packing="bytes")
    check_conv_packed(rng, Precision.parse("s8"), Precision.parse("s8"), (1, 4, 4, 27), 32, 1, 1, 0,
                      Precision.parse("u2"), config=TileConfig(2, 1, 1, 2, 2), pool="max", packing="bytes")


def test_apmm_zero_points(rng):
    check_apmm(rng, Precision.parse("u3"), Precision.parse("u2"), 6, 9, 80, TileConfig(1, 1, 1, 2, 2), zw=5, zx=1)


# Tiny convolutions through the APConv kernel: taps, strides, borders, binary activations' padding.
CONV_CASES = [
    ("u2", "b1", (1, 5, 6, 40), 16, 3, 1, 1, TileConfig(1, 1, 1, 2, 2), False),
    ("b1", "s2", (2, 7, 5, 20), 16, 3, 2, 1, TileConfig(1, 1, 1, 1, 3, 0, 1, 2), True),
    ("s3", "u2", (1, 4, 4, 300), 20, 1, 1, 0, TileConfig(1, 1, 1, 2, 2), False),
    ("b1", "b1", (1, 9, 9, 8), 16, 5, 2, 2, TileConfig(1, 1, 1, 2, 2, 0, 2, 2), False),
    # taps of whole k-steps (C > 128) two a stage; half k-step taps (C <= 128) eight a stage
    ("u2", "b1", (1, 4, 5, 160), 16, 3, 1, 1, TileConfig(1, 1, 1, 2, 2, stage_steps=2), False),
    ("u2", "s2", (1, 5, 5, 70), 16, 3, 1, 1, TileConfig(1, 1, 1, 2, 2, stage_steps=4), True),
    # +-1 weights (the taps' pixel sums enter every output) in 49-tap windows, most of them cut by the
    # border: each pixel's sums split over 8 lanes (64 threads, 8 pixels a block), several taps a lane
    ("u2", "b1", (1, 6, 7, 12), 16, 7, 1, 3, TileConfig(2, 1, 1, 1, 2), False),
]


@pytest.mark.parametrize("px,pw,image,K,k,stride,padding,cfg,out_float", CONV_CASES,
                         ids=[f"{c[0]}{c[1]}-{c[4]}x{c[4]}s{c[5]}" for c in CONV_CASES])
def test_apconv_tiny(rng, px, pw, image, K, k, stride, padding, cfg, out_float):
    check_conv(rng, Precision.parse(px), Precision.parse(pw), image, K, k, stride, padding, cfg, out_float)


# Split K (grid z): blocks sum shares of the k-tiles; the last of a tile to finish adds the others' partial
# tiles and runs the epilogue.  Whole-k-step taps in three shares; half-k-step taps, two k-steps a stage, a
# ragged split (3 k-tiles -> 2 + 1) with +-1 weights and float32 out; more shares than k-tiles (empty ones
# add zeros); a first layer's word taps (each share starts mid-window).
SPLIT_CASES = [
    ("u2", "b1", (1, 5, 6, 160), 16, 3, 1, 1, TileConfig(1, 1, 1, 2, 2, split_k=3), False),
    ("b1", "s2", (1, 5, 4, 70), 20, 3, 2, 1, TileConfig(1, 1, 1, 1, 2, stage_steps=2, split_k=2), True),
    ("s3", "u2", (1, 4, 4, 40), 16, 1, 1, 0, TileConfig(1, 1, 1, 2, 2, split_k=3), False),
]


@pytest.mark.parametrize("px,pw,image,K,k,stride,padding,cfg,out_float", SPLIT_CASES,
                         ids=[f"{c[0]}{c[1]}-{c[4]}x{c[4]}-z{c[7].split_k}" for c in SPLIT_CASES])
def test_apconv_split_k(rng, px, pw, image, K, k, stride, padding, cfg, out_float):
    check_conv(rng, Precision.parse(px), Precision.parse(pw), image, K, k, stride, padding, cfg, out_float)


def test_apconv_split_k_word_taps(rng):
    check_image_conv(rng, (1, 9, 10, 3), 16, 7, 2, 3, "s8", 0, layout="NHWC", config=TileConfig(1, 1, 1, 2, 2, split_k=3))


def test_apconv_split_k_fused_epilogue_and_relaunch(rng):
    """The fused epilogue after a split (thresholds; two m-blocks of a pixel add their code sums), launched
    twice: the counters are back at zero after each launch, so the second launch's output is the first's."""
    from apnumba import reference as R
    from apnumba.conv import PackedConvWeight, prepare_apconv
    from apnumba.packed import PackedTensor

    x = R.random_codes(rng, (1, 4, 5, 200), "u2")
    w = R.random_codes(rng, (40, 3, 3, 200), "b1")
    scale = rng.uniform(0.02, 0.05, 40).astype(np.float32)
    bias = rng.uniform(-1, 1, 40).astype(np.float32)
    expect = R.requantize(R.conv2d_int(x, w, 1, 1).reshape(20, 40), scale, bias, "u2", 0, True)
    out = PackedTensor.empty((20, 40), "u2")
    run = prepare_apconv(PackedTensor.from_codes(x, "u2"), PackedConvWeight.from_codes(w, "b1"), 1, 1, out=out,
                         scale=scale, bias=bias, relu=True, config=TileConfig(2, 1, 1, 1, 2, split_k=4))
    for _ in range(2):
        poison = np.zeros(out.words.shape, np.uint32)
        poison[:, :, :2] = 0xDEADBEEF  # the words of the 40 channels (the row's padding words stay zero)
        out.words.copy_to_device(poison)
        run()
        assert (out.words_host() == R.pack(expect, "u2")).all() and (out.rowsum_host() == R.row_sums(expect)).all()
        assert run.split_count.copy_to_host().tolist() == [0] * 6  # 3 pixel blocks x 2 channel blocks


def test_apconv_zero_points(rng):
    check_conv(rng, Precision.parse("u3"), Precision.parse("u2"), (1, 4, 5, 9), 16, 3, 1, 1,
               TileConfig(1, 1, 1, 2, 2), zx=2, zw=1)


# (out, residual, signs, device constants): integer thresholds where there is no residual and the constants
# are host values (scales of both signs, +-1 codes), else the float32 epilogue
EPILOGUES = [("u2", None, False, False), ("s3", None, True, False), ("b1", None, True, False),
             ("u2", None, False, True), ("b1", "s3", False, False), ("s3", "u2", True, False)]


@pytest.mark.parametrize("out,res,signs,device", EPILOGUES, ids=[f"{e[0]}-{e[1]}-{e[2]}-{e[3]}" for e in EPILOGUES])
def test_apconv_fused_epilogue(rng, out, res, signs, device):
    check_conv_packed(rng, Precision.parse("u2"), Precision.parse("b1"), (1, 4, 5, 40), 40, 3, 1, 1,
                      Precision.parse(out), relu=out != "s3", residual_precision=res and Precision.parse(res),
                      config=TileConfig(2, 1, 1, 1, 2), signs=signs, device_constants=device)


@pytest.mark.parametrize("device", [False, True])
def test_apconv_fused_epilogue_binary_activations(rng, device):
    """+-1 activations: the weight-sum term (ex * SWv) is nonzero and differs at the border pixels; two
    words a tile (the epilogue's words of a pixel, loaded and stored as one block), thresholds or float32."""
    check_conv_packed(rng, Precision.parse("b1"), Precision.parse("s2"), (1, 4, 5, 40), 60, 3, 1, 1,
                      Precision.parse("u2"), config=TileConfig(2, 1, 2, 1, 2), signs=True, device_constants=device)


def test_apconv_fused_epilogue_tile_past_the_row(rng):
    """200 channels in 96-row tiles: the last tile's words 6..8 of a row of 8 (256 channels' padding) - its
    word 8 is not stored (it would be word 0 of the next pixel's row)."""
    check_conv_packed(rng, Precision.parse("u2"), Precision.parse("b1"), (1, 3, 4, 40), 200, 3, 1, 1,
                      Precision.parse("u2"), config=TileConfig(2, 1, 3, 1, 2))


BYTE_OUTPUTS = [("u8", None, None, False, 70, 2), ("s8", "max", None, True, 40, 4), ("u8", None, "u2", False, 40, 1),
                ("b1", None, None, True, 40, 1)]


@pytest.mark.parametrize("out,pool,res,device,K,mt", BYTE_OUTPUTS, ids=["-".join(map(str, c)) for c in BYTE_OUTPUTS])
def test_apconv_fused_epilogue_bytes_out(rng, out, pool, res, device, K, mt):
    """The fused epilogue writing code bytes (the input of an int8 next layer): thresholds or float32
    (device constants, residual), pooled, partial words, words of padding channels, +-1 codes."""
    check_conv_packed(rng, Precision.parse("u2"), Precision.parse("b1"), (1, 5, 4, 40), K, 3, 1, 1,
                      Precision.parse(out), relu=out == "u8", residual_precision=res and Precision.parse(res),
                      config=TileConfig(2, 1, mt, 1, 2), pool=pool, signs=True, device_constants=device,
                      out_packing="bytes")


POOLINGS = [("max", "u2", False, False, 64, 1), ("max", "s3", True, True, 64, 1), ("max", "s3", True, False, 64, 1),
            ("max", "b1", False, False, 40, 4), ("avg", "s3", False, False, 64, 1),
            ("max", "s3", True, False, 150, 3)]  # 96-row tiles (three m16 tiles a warp): two blocks, a partial word


@pytest.mark.parametrize("pool,out,signs,device,K,mt", POOLINGS, ids=["-".join(map(str, c)) for c in POOLINGS])
def test_apconv_fused_pooling(rng, pool, out, signs, device, K, mt):
    """2x2/2 pooling in the epilogue: odd sizes (floor), binary padding corrections, two m-blocks, negative
    scales, host or device constants; 40 channels in a 128-row tile leave two words of padding channels;
    150 channels in 96-row tiles (as VGG's first layer runs): three words a block, the last partly padding."""
    check_conv_packed(rng, Precision.parse("u2"), Precision.parse("b1"), (1, 5, 4, 40), K, 3, 1, 1,
                      Precision.parse(out), relu=pool == "max", config=TileConfig(2, 1, mt, 1, 2),
                      pool=pool, signs=signs, device_constants=device)


def test_two_chained_layers(rng):
    """float -> pack -> conv -> fused epilogue (packed) -> conv -> float out, as the reference chain does it."""
    import numpy as np

    from apnumba import reference as R
    from apnumba.conv import PackedConvWeight, apconv
    from apnumba.packed import PackedTensor
    from apnumba.precision import quantize

    xf = rng.standard_normal((1, 5, 5, 40)).astype(np.float32)
    pa, pw = Precision.parse("u2"), Precision.parse("b1")
    w1 = R.random_codes(rng, (32, 3, 3, 40), pw)
    w2 = R.random_codes(rng, (16, 3, 3, 32), pw)
    s1, b1 = np.full(32, 0.05, np.float32), rng.uniform(-0.5, 0.5, 32).astype(np.float32)
    s2, b2 = np.full(16, 0.5, np.float32), rng.uniform(-1, 1, 16).astype(np.float32)
    h = PackedTensor.empty((25, 32), pa)
    apconv(PackedTensor.from_float(xf, pa, scale=0.5), PackedConvWeight.from_codes(w1, pw), 1, 1, out=h,
           scale=s1, bias=b1, relu=True, config=TileConfig(2, 1, 1, 1, 2))
    y = apconv(h, PackedConvWeight.from_codes(w2, pw), 1, 1, scale=s2, bias=b2, config=TileConfig(1, 1, 1, 1, 2))
    xq = quantize(xf.reshape(-1, 40), pa, 0.5).reshape(1, 5, 5, 40)
    hq = R.requantize(R.conv2d_int(xq, w1, 1, 1).reshape(-1, 32), s1, b1, pa, 0, True).reshape(1, 5, 5, 32)
    expect = R.conv2d_int(hq, w2, 1, 1).astype(np.int32).astype(np.float32) * s2 + b2
    assert (y.copy_to_host() == expect).all()


@pytest.mark.parametrize("prec,zp", [("u2", 1), ("s3", 0), ("b1", 0)])
def test_pooling_and_add(rng, prec, zp):
    check_pooling_and_add(rng, (1, 4, 5, 40), Precision.parse(prec), zp)


@pytest.mark.parametrize("side", [3, 1])  # 1: a global pooling's output, whose row sums the flatten shares
def test_flatten_then_linear(rng, side):
    """conv output -> flatten (a view) -> fully connected layer with weights in the flatten order."""

    from apnumba import ops, reference as R
    from apnumba.matmul import apmm
    from apnumba.packed import PackedTensor

    x = R.random_codes(rng, (2, side, side, 40), Precision.parse("u2"))
    X = PackedTensor.from_codes(x, "u2")
    flat = ops.flatten(X)
    torch_flat = x.transpose(0, 3, 1, 2).reshape(2, -1)  # NCHW flatten
    assert (flat.rowsum_host() == torch_flat.sum(axis=1)).all()
    w = R.random_codes(rng, (16, 40 * side * side), Precision.parse("b1"))  # torch order (c, h, w)
    W = PackedTensor.from_codes(R.flatten_weight_columns(w, 40, side, side, "b1"), "b1")
    y = apmm(W, flat, config=TileConfig(1, 1, 1, 2, 2)).copy_to_host()
    assert (y == R.matmul_int(w, torch_flat)).all()


def test_unfused_requantize(rng):
    import numpy as np

    from apnumba import ops, reference as R
    from apnumba.packed import PackedTensor
    from numba import cuda

    y = rng.integers(-300, 300, (6, 40)).astype(np.int32)
    scale = rng.uniform(0.001, 0.02, 40).astype(np.float32)
    bias = rng.uniform(-1, 1, 40).astype(np.float32)
    out = PackedTensor.empty((6, 40), "u2")
    ops.requantize(cuda.to_device(y), scale, bias, out, relu=True)
    expect = R.requantize(y, scale, bias, "u2", 0, True)
    assert (out.words_host() == R.pack(expect, "u2")).all() and (out.rowsum_host() == R.row_sums(expect)).all()


# A first layer on the image's bytes: compact RGB (word taps from one-word pixels, a 7x7/2 stem shape and
# an 11x11/4 one), grey with a zero point, and 6 channels (padded pixels, 16-byte taps)
IMAGE_CONVS = [((1, 9, 10, 3), 16, 7, 2, 3, "s8", 0, "NCHW", TileConfig(1, 1, 1, 2, 2)),
               ((2, 12, 11, 3), 16, 11, 4, 2, "s8", 0, "NHWC", TileConfig(1, 1, 1, 1, 2, 0, 2, 2)),
               ((1, 6, 5, 1), 32, 3, 1, 1, "u8", 7, "NCHW", TileConfig(2, 1, 1, 1, 2)),
               ((1, 5, 6, 6), 16, 3, 2, 1, "s8", 0, "NHWC", TileConfig(1, 1, 1, 2, 2))]


@pytest.mark.parametrize("image,K,k,stride,padding,px,zx,layout,cfg", IMAGE_CONVS,
                         ids=[f"c{c[0][3]}-{c[2]}x{c[2]}s{c[3]}-{c[7]}" for c in IMAGE_CONVS])
def test_image_conv(rng, image, K, k, stride, padding, px, zx, layout, cfg):
    check_image_conv(rng, image, K, k, stride, padding, px, zx, layout=layout, config=cfg)


def test_compact_image_is_a_conv_input_only(rng):
    """One word a pixel is for convolutions: apmm (whole k-steps a row) refuses it; bits or > 4 bytes can't be compact."""
    from numba import cuda

    from apnumba import reference as R
    from apnumba.matmul import apmm
    from apnumba.packed import PackedTensor

    x = PackedTensor.from_image(rng.standard_normal((1, 3, 4, 5)).astype(np.float32), "s8", 0.1)
    assert x.compact and x.kwords == 1 and x.words.shape == (1, 20, 1) and "compact=True" in repr(x)
    w = PackedTensor.from_codes(R.random_codes(rng, (8, 3), "s8"), "s8", packing="bytes")
    with pytest.raises(ValueError, match="x: a compact PackedTensor"):
        apmm(w, x)
    for K, packing in ((5, "bytes"), (3, "bits")):
        with pytest.raises(ValueError, match="compact: one word a row"):
            PackedTensor(cuda.to_device(np.zeros((1, 2, 1), np.uint32)), cuda.to_device(np.zeros(2, np.int32)), (2, K), "s8",
                         packing=packing, compact=True)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_first_layer_patches(rng, layout):
    """float images -> quantized receptive fields (the first layer's input), vs reference.patches + quantize."""
    import numpy as np

    from apnumba import reference as R
    from apnumba.packed import PackedTensor
    from apnumba.precision import quantize

    x = rng.standard_normal((2, 6, 5, 3)).astype(np.float32)  # NHWC values
    arg = x.transpose(0, 3, 1, 2).copy() if layout == "NCHW" else x
    t = PackedTensor.from_patches(arg, 3, 2, 1, "s8", scale=0.05, layout=layout)
    expect = quantize(R.patches(x, 3, 3, 2, 1), "s8", 0.05)
    assert t.image == (2, 3, 3) and t.shape == (18, 27)
    assert (t.words_host() == R.pack(expect, "s8")).all() and (t.rowsum_host() == R.row_sums(expect)).all()
    with pytest.raises(ValueError, match="from_image"):  # bytes read the image directly, no fields
        PackedTensor.from_patches(arg, 3, 2, 1, "s8", layout=layout, packing="bytes")


def test_two_bindings_of_one_kernel_keep_their_own_grids(rng):
    """A network binds one compiled kernel for several layers: each launch must keep its own grid."""
    from apnumba import reference as R
    from apnumba.matmul import prepare_apmm
    from apnumba.packed import PackedTensor

    cfg = TileConfig(1, 1, 1, 1, 2)  # 16 x 8 output tiles
    w, x = R.random_codes(rng, (40, 256), "u1"), R.random_codes(rng, (20, 256), "u1")
    big = prepare_apmm(PackedTensor.from_codes(w, "u1"), PackedTensor.from_codes(x, "u1"), config=cfg)  # 3 x 3 blocks
    prepare_apmm(PackedTensor.from_codes(w[:16], "u1"), PackedTensor.from_codes(x[:8], "u1"), config=cfg)  # 1 block
    big()
    assert (big.out.copy_to_host() == w.astype(np.int64) @ x.T).all()
