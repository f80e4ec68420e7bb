"""Checks shared by the simulator tests and the GPU tests: run a kernel, compare with the reference."""

import numpy as np
from numba import cuda

from apnumba import reference as R
from apnumba.kernels import probe
from apnumba.matmul import apmm
from apnumba.packed import PackedTensor
from apnumba.precision import Encoding, Precision, quantize

ENCODINGS_BY_BITS = {1: ["binary", "unsigned", "signed"]}


def precisions(bits):
    return [Precision(bits, e) for e in ENCODINGS_BY_BITS.get(bits, ["unsigned", "signed"])]


INT_POISON = np.int32(-(2**31))  # no product of in-range operands is this value
FLOAT_POISON = np.float32(np.nan)


def check_tiles(rng, shape, op, tiles):
    """Random tiles through probe.tile_kernel against numpy: D = popc(A op B) + C."""
    m, n, k = probe.MMA_SHAPES[shape]
    words = k // 32
    a = rng.integers(0, 2**32, (tiles, m, words), dtype=np.uint64).astype(np.uint32)
    b = rng.integers(0, 2**32, (tiles, n, words), dtype=np.uint64).astype(np.uint32)
    c = rng.integers(-1000, 1000, (tiles, m, n)).astype(np.int32)
    d = cuda.to_device(np.full(tiles * m * n, INT_POISON))
    probe.tile_kernel(shape, op)[tiles, 32](
        cuda.to_device(a.ravel()), cuda.to_device(b.ravel()), cuda.to_device(c.ravel()), d
    )
    both = (a[:, :, None, :] & b[:, None, :, :]) if op == "and" else (a[:, :, None, :] ^ b[:, None, :, :])
    expect = np.bitwise_count(both).sum(axis=-1).astype(np.int32) + c
    got = d.copy_to_host().reshape(tiles, m, n)
    assert (got == expect).all(), f"{shape} {op}: {np.argwhere(got != expect)[:5]}"


def check_pack(rng, rows, K, precision, dtype=np.float32, zero_point=0, per_row_scale=False, packing="bits"):
    """GPU quantize+pack vs the reference quantizer and packer; rowsum; unpack round trip."""
    x = (rng.standard_normal((rows, K)) * 2.5).astype(dtype)
    flat = x.ravel()
    specials = np.array([0.5, 1.5, -2.5, np.nan, -0.0, np.inf, -np.inf, 6e4], dtype=dtype)
    flat[: min(flat.size, specials.size)] = specials[: flat.size]
    scale = np.float32(rng.uniform(0.3, 1.5, rows) if per_row_scale else rng.uniform(0.3, 1.5))
    zp = zero_point if precision.encoding is Encoding.UNSIGNED else 0
    t = PackedTensor.from_float(cuda.to_device(x), precision, scale, zp, packing=packing)
    q = quantize(x.astype(np.float32), precision, scale, zp)
    assert (t.words_host() == R.pack(q, precision, packing)).all()
    assert (t.rowsum_host() == R.row_sums(q)).all()
    assert (t.codes() == q).all()


def check_apmm(rng, pw, px, M, N, K, config=None, out_float=False, layout="mn", zw=0, zx=0, w_extreme=False,
               packing="bits"):
    """apmm on random codes vs the plain integer product (and its float32 epilogue), poisoned output."""
    w = R.random_codes(rng, (M, K), pw)
    x = R.random_codes(rng, (N, K), px)
    if w_extreme:  # the largest magnitudes each correction term can see
        w[:, : K // 2] = pw.lo
        x[: N // 2] = px.hi if px.hi else px.lo
    W = PackedTensor.from_codes(w, pw, zero_point=zw, packing=packing)
    X = PackedTensor.from_codes(x, px, zero_point=zx, packing=packing)
    exact = R.matmul_int(w, x, zw, zx)
    assert (np.abs(exact) < 2**31).all()
    shape = (M, N) if layout == "mn" else (N, M)
    if out_float:
        scale = rng.uniform(-2, 2, M).astype(np.float32)
        bias = rng.uniform(-100, 100, M).astype(np.float32)
        out = cuda.to_device(np.full(shape, FLOAT_POISON))
        apmm(W, X, out=out, scale=scale, bias=bias, layout=layout, config=config)
        expect = exact.astype(np.int32).astype(np.float32) * scale[:, None] + bias[:, None]
    else:
        out = cuda.to_device(np.full(shape, INT_POISON))
        apmm(W, X, out=out, layout=layout, config=config)
        expect = exact.astype(np.int32)
    got = out.copy_to_host()
    if layout == "nm":
        got = got.T
    bad = np.argwhere(got != expect)
    assert bad.size == 0, (
        f"w{pw}a{px} ({packing}) M={M} N={N} K={K} {config.short() if config else 'default'}: "
        f"{len(bad)} wrong, first at {bad[:3].tolist()}: got {got[tuple(bad[0])]}, expected {expect[tuple(bad[0])]}"
    )


def check_conv(rng, px, pw, image, K, k, stride, padding, config=None, out_float=False, zx=0, zw=0, packing="bits"):
    """apconv on random codes vs the plain integer convolution (and its float32 epilogue), poisoned output."""
    from apnumba.conv import PackedConvWeight, apconv

    N, H, W, C = image
    x = R.random_codes(rng, image, px)
    w = R.random_codes(rng, (K, k, k, C), pw)
    exact = R.conv2d_int(x, w, stride, padding, zx, zw)
    X = PackedTensor.from_codes(x, px, zero_point=zx, packing=packing)
    Wt = PackedConvWeight.from_codes(w, pw, zero_point=zw, packing=packing)
    if out_float:
        scale = rng.uniform(-2, 2, K).astype(np.float32)
        bias = rng.uniform(-50, 50, K).astype(np.float32)
        out = cuda.to_device(np.full(exact.shape, FLOAT_POISON))
        apconv(X, Wt, stride, padding, out=out, scale=scale, bias=bias, config=config)
        expect = exact.astype(np.int32).astype(np.float32) * scale + bias
    else:
        out = cuda.to_device(np.full(exact.shape, INT_POISON))
        apconv(X, Wt, stride, padding, out=out, config=config)
        expect = exact.astype(np.int32)
    got = out.copy_to_host()
    bad = np.argwhere(got != expect)
    assert bad.size == 0, (
        f"conv x{px} w{pw} ({packing}) {image} K={K} {k}x{k} s{stride} p{padding} {config.short() if config else 'default'}: "
        f"{len(bad)} wrong, first at {bad[:3].tolist()}: got {got[tuple(bad[0])]}, expected {expect[tuple(bad[0])]}"
    )


def check_image_conv(rng, image, K, k, stride, padding, px="s8", zx=0, pw="s8", layout="NCHW", config=None):
    """A byte-packed first layer: PackedTensor.from_image (float images -> NHWC code bytes, one word a pixel
    for <= 4 channels) vs quantize + reference.pack, then apconv reading those bytes directly (one word a
    tap) vs the plain integer convolution of the quantized image; poisoned output."""
    from apnumba.conv import PackedConvWeight, apconv

    N, H, W, C = image
    x = rng.standard_normal(image).astype(np.float32)  # NHWC values
    arg = x.transpose(0, 3, 1, 2).copy() if layout == "NCHW" else x
    X = PackedTensor.from_image(arg, px, scale=0.05, zero_point=zx, layout=layout)
    codes = quantize(x, px, 0.05, zx)
    expect_words = R.pack(codes.reshape(-1, C), px, "bytes")
    assert X.image == (N, H, W) and X.shape == (N * H * W, C) and X.compact == (C <= 4)
    assert (X.words_host() == expect_words[:, :, : X.kwords]).all(), "from_image: words"
    assert (X.rowsum_host() == R.row_sums(codes.reshape(-1, C))).all(), "from_image: row sums"
    assert (X.codes() == codes.reshape(-1, C)).all()
    w = R.random_codes(rng, (K, k, k, C), pw)
    exact = R.conv2d_int(codes, w, stride, padding, zx).astype(np.int32)
    out = cuda.to_device(np.full(exact.shape, INT_POISON))
    apconv(X, PackedConvWeight.from_codes(w, pw, packing="bytes"), stride, padding, out=out, config=config)
    got = out.copy_to_host()
    bad = np.argwhere(got != exact)
    assert bad.size == 0, f"image conv {image} {layout} x{px} zp {zx} K={K} {k}x{k}/{stride} p{padding}: {len(bad)} wrong"


def check_conv_packed(rng, px, pw, image, K, k, stride, padding, out_precision, relu=True, residual_precision=None,
                      config=None, pool=None, packing="bits", signs=False, device_constants=False, out_packing="bits"):
    """apconv with the fused epilogue (affine, residual, ReLU, requantize, pack) vs reference.requantize + pack.

    out_packing "bytes": the output as code bytes (an int8 next layer's input).
    signs: half the channels' scales negative; device_constants: scale and bias given as device arrays
    (the kernel then runs the float32 epilogue; host ones without a residual give integer thresholds)."""
    from apnumba.conv import PackedConvWeight, apconv

    N, H, W, C = image
    x = R.random_codes(rng, image, px)
    w = R.random_codes(rng, (K, k, k, C), pw)
    exact = R.conv2d_int(x, w, stride, padding).astype(np.int32)
    OH, OW = exact.shape[1:3]
    # Scales that put the outputs across the next precision's range, ties and all.
    spread = float(np.abs(exact).max() or 1)
    scale = (rng.uniform(0.5, 1.5, K) * (2 ** out_precision.bits) / spread).astype(np.float32)
    bias = rng.uniform(-1, 1, K).astype(np.float32)
    if signs:
        scale[::2] *= -1
    residual = res_codes = None
    if residual_precision is not None:
        res_codes = R.random_codes(rng, (N * OH * OW, K), residual_precision)
        residual = PackedTensor.from_codes(res_codes, residual_precision)
    if pool:
        OH, OW = OH // 2, OW // 2
    out = PackedTensor.empty((N * OH * OW, K), out_precision, packing=out_packing)
    apconv(PackedTensor.from_codes(x, px, packing=packing), PackedConvWeight.from_codes(w, pw, packing=packing),
           stride, padding, out=out,
           scale=cuda.to_device(scale) if device_constants else scale, bias=cuda.to_device(bias) if device_constants else bias,
           relu=relu, residual=residual, residual_scale=0.5, pool=pool, config=config)
    if pool:
        expect = R.requantize_pool(exact, scale, bias, out_precision, 0, relu, pool).reshape(-1, K)
    else:
        expect = R.requantize(exact.reshape(-1, K), scale, bias, out_precision, 0, relu, res_codes, 0, 0.5)
    got_words = out.words_host()
    assert (got_words == R.pack(expect, out_precision, out_packing)).all(), (
        f"packed conv output differs: {np.argwhere(R.unpack(got_words, out_precision, K, out_packing) != expect)[:4].tolist()}"
    )
    assert (out.rowsum_host() == R.row_sums(expect)).all()
    assert out.image == (N, OH, OW)


def check_pooling_and_add(rng, image, precision, zero_point=0):
    """max/avg pooling, residual add and flatten on packed tensors vs the reference (codes, words, row sums)."""
    from apnumba import ops

    N, H, W, C = image
    x = R.random_codes(rng, image, precision)
    X = PackedTensor.from_codes(x, precision, scale=0.5, zero_point=zero_point)
    for k, stride, pad in [(2, 2, 0), (3, 2, 1), (3, 1, 1)]:
        got = ops.max_pool2d(X, k, stride, pad)
        expect = R.max_pool_codes(x, k, stride, pad)
        assert (got.words_host() == R.pack(expect.reshape(-1, C), precision)).all()
        assert (got.rowsum_host() == R.row_sums(expect.reshape(-1, C))).all()
    out_p = Precision.parse("u4") if precision.encoding.value == "binary" else precision
    for k, stride, pad in [(2, 2, 0), (3, 1, 1), (min(H, W), 1, 0)]:  # the last: global pooling on a square image
        OH, OW = R.conv_output_size(H, k, stride, pad), R.conv_output_size(W, k, stride, pad)
        out = PackedTensor.empty((N * OH * OW, C), out_p, scale=0.25)
        got = ops.avg_pool2d(X, k, stride, pad, out=out)
        expect = R.avg_pool_codes(x, k, stride, pad, precision, zero_point, np.float32(0.5 / (k * k * 0.25)), out_p, 0)
        assert (got.words_host() == R.pack(expect.reshape(-1, C), out_p)).all()
        assert (got.rowsum_host() == R.row_sums(expect.reshape(-1, C))).all()
    b = R.random_codes(rng, image, Precision.parse("s3"))
    Bt = PackedTensor.from_codes(b, "s3", scale=0.75)
    out = PackedTensor.empty((N * H * W, C), "u3", scale=0.6)
    ops.add(X, Bt, out, relu=True)
    expect = R.add_codes(x, zero_point, np.float32(0.5 / 0.6), b, 0, np.float32(0.75 / 0.6), Precision.parse("u3"), 0, True)
    assert (out.words_host() == R.pack(expect.reshape(-1, C), "u3")).all()
    assert (out.rowsum_host() == R.row_sums(expect.reshape(-1, C))).all()


def check_network(rng, model, input_shape, tile=None, layout="NCHW", capture=False):
    """A Network's logits against its numpy twin, exactly (integer pipeline, same float32 last layer);
    each step is also checked on its own, so a failure names the first step that differs."""
    from apnumba.layers import Network

    net = Network(model, input_shape, layout=layout, tile=tile)
    x = rng.standard_normal(input_shape).astype(np.float32)
    logits = net.forward(x).copy_to_host()
    results = {id(net.input): x}
    for step in net.steps:
        expect = step.ref(results[id(step.src)], results)
        results[id(step.out)] = expect
        if step.name.endswith("Flatten"):  # the GPU keeps (h, w, c) order, the twin torch's (c, h, w)
            continue
        got = step.out.codes().reshape(expect.shape) if isinstance(step.out, PackedTensor) else step.out.copy_to_host()
        assert (np.asarray(got).reshape(expect.shape) == expect).all(), (
            f"step {step.name} differs at {np.argwhere(np.asarray(got).reshape(expect.shape) != expect)[:4].tolist()}")
        if isinstance(step.out, PackedTensor):  # the row sums the next product's corrections read
            sums = R.row_sums(np.asarray(expect).reshape(step.out.rows, -1))
            assert (step.out.rowsum_host() == sums).all(), f"step {step.name}: row sums differ"
    assert (logits == net.reference(x)).all()
    cpu = Network(model, input_shape, layout=layout, device="cpu")  # the plan without a GPU: same steps, same logits
    assert [s.name for s in cpu.steps] == [s.name for s in net.steps]
    assert (cpu.forward(x) == logits).all()
    if capture:
        net.capture()
        x2 = rng.standard_normal(input_shape).astype(np.float32)
        assert (net.forward(x2).copy_to_host() == net.reference(x2)).all()
    return net
