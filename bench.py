#!/usr/bin/env python
"""apnumba's benchmark report.

    python bench.py                      every section (peak, apmm, conv, nets)
    python bench.py nets --batch 8 256 --bits w1a2 w2a2
    python bench.py apmm --quick         a section, smaller and untuned (about a minute)
    python bench.py apmm --bits w1a2 w2a2 --json out.json

Every ratio is against the b1 mma.sync peak measured at the start of the same run,
on the same card.  Operations: logical = 2*M*N*K; bit-ops = logical * p * q.
GPU time per call comes from a CUDA graph of many calls (launch gaps excluded);
Python wall time per call is measured separately.  Without a GPU the script says
so, runs a small correctness demo on the CPU reference, and exits 0.
"""

import argparse
import json
import platform
import sys
import time

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

console = Console()


# ---------------------------------------------------------------- helpers


def versions():
    import numba

    out = {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__}
    try:
        from importlib.metadata import version

        out["numba-cuda"] = version("numba-cuda")
        out["apnumba"] = version("apnumba")
    except Exception:
        pass
    try:
        import torch

        out["torch"] = torch.__version__
    except Exception:
        pass
    return out


def torch_or_none():
    try:
        import torch

        return torch if torch.cuda.is_available() else None
    except Exception:
        return None


def torch_gpu_time(torch, fn, calls=50, replays=5):
    """Median GPU microseconds per fn() call, from a CUDA graph of `calls` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        stop.record()
        stop.synchronize()
        times.append(1e3 * start.elapsed_time(stop) / calls)
    return float(np.median(times))


def calls_for(us_estimate, budget_us=20000, lo=2, hi=200):
    return int(max(lo, min(hi, budget_us // max(us_estimate, 1))))


# ---------------------------------------------------------------- sections


def section_peak(args, report):
    """The b1 mma.sync instruction rate: register-only loops, 4 blocks of 8 warps per SM."""
    from numba import cuda

    from apnumba.kernels import probe

    sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
    blocks, threads = 4 * sms, 256
    out = cuda.device_array(blocks * threads, dtype=np.int32)
    # Bring the clocks up first: an idle H100 sits at a few hundred MHz and ramps over ~100 ms.
    warm = probe.peak_kernel("m16n8k256", "and", 8)
    t_end = time.perf_counter() + 1.5
    while time.perf_counter() < t_end:
        warm[blocks, threads](512, 1, out)
        cuda.synchronize()
    rows = []
    for shape, op, chains in [("m16n8k256", "and", 8), ("m16n8k256", "and", 4), ("m8n8k128", "and", 8), ("m16n8k256", "xor", 8)]:
        kernel = probe.peak_kernel(shape, op, chains)
        iters = 4096
        kernel[blocks, threads](8, 1, out)  # compile + warm up
        cuda.synchronize()
        best = None
        for _ in range(5):
            start, stop = cuda.event(), cuda.event()
            start.record()
            kernel[blocks, threads](iters, 1, out)
            stop.record()
            stop.synchronize()
            ms = cuda.event_elapsed_time(start, stop)
            best = ms if best is None else min(best, ms)
        mmas = blocks * (threads // 32) * iters * chains
        tops = mmas * probe.ops_per_mma(shape) / (best * 1e-3) / 1e12
        rows.append({"instruction": f"mma.sync {shape} .{op}.popc", "chains": chains, "tops": tops})
    report["peak_tops"] = rows[0]["tops"]
    report["peak"] = rows
    table = Table(title=f"b1 mma.sync peak on {report['device']} ({sms} SMs)")
    for col in ("instruction", "independent accumulators", "TOPS"):
        table.add_column(col, justify="right" if col != "instruction" else "left")
    for r in rows:
        table.add_row(r["instruction"], str(r["chains"]), f"{r['tops']:,.0f}")
    console.print(table)
    console.print(f"Ratios below are against [bold]{report['peak_tops']:,.0f} TOPS[/] (m16n8k256 AND, 8 chains).")


def _apmm_case(name, p, q, M, N, K, args, torch, stream, tune, tile_shape=None):
    from numba import cuda

    from apnumba import reference as R
    from apnumba.graph import gpu_time_per_call
    from apnumba.matmul import apmm, choose_config, prepare_apmm
    from apnumba.packed import PackedTensor
    from apnumba.precision import parse_wa

    rng = np.random.default_rng(p * 100 + q)
    pw, px = parse_wa(f"w{p}a{q}")  # +-1 weights at 1 bit, else signed; unsigned activations
    W = PackedTensor.from_codes(R.random_codes(rng, (M, K), pw), pw)
    X = PackedTensor.from_codes(R.random_codes(rng, (N, K), px), px)
    out = cuda.device_array((M, N), dtype=np.int32)
    cfg = choose_config(p, q, *(tile_shape or (M, N, K)), False, autotune=tune and not args.quick)
    run = prepare_apmm(W, X, out=out, config=cfg, stream=stream)  # arguments converted once
    run()
    stream.synchronize()
    logical = 2.0 * M * N * K
    est_us = logical * p * q / 8e15 * 1e6
    gpu_us = gpu_time_per_call(stream, run, calls=calls_for(est_us), replays=3)
    t0 = time.perf_counter()
    reps = 50
    for _ in range(reps):
        run()
    stream.synchronize()
    py_us = (time.perf_counter() - t0) / reps * 1e6
    t0 = time.perf_counter()
    for _ in range(reps):
        apmm(W, X, out=out, config=cfg, stream=stream)
    stream.synchronize()
    api_us = (time.perf_counter() - t0) / reps * 1e6
    row = {
        "case": name, "bits": f"w{p}a{q}", "M": M, "N": N, "K": K, "tile": cfg.short(),
        "gpu_us": gpu_us, "python_us": py_us, "apmm_call_us": api_us,
        "logical_tops": logical / gpu_us / 1e6, "bit_tops": logical * p * q / gpu_us / 1e6,
    }
    if torch is not None:
        a = torch.randn(M, K, device="cuda", dtype=torch.float16)
        b = torch.randn(K, N, device="cuda", dtype=torch.float16)
        row["torch_fp16_us"] = torch_gpu_time(torch, lambda: a @ b, calls=calls_for(logical / 6e14 * 1e6))
        try:
            a8 = torch.randint(-8, 8, (M, K), device="cuda", dtype=torch.int8)
            b8 = torch.randint(-8, 8, (N, K), device="cuda", dtype=torch.int8).t()  # column-major, as cuBLASLt wants
            row["torch_int8_us"] = torch_gpu_time(torch, lambda: torch._int_mm(a8, b8), calls=calls_for(logical / 1e15 * 1e6))
        except Exception as e:  # _int_mm has shape rules (M > 16, multiples of 8)
            row["torch_int8_us"] = None
            row["torch_int8_note"] = str(e).splitlines()[0][:80]
        del a, b
    return row


def apmm_cases(args):
    big = 4096 if args.quick else 8192
    large_bits = [(1, 1), (1, 2), (2, 2), (1, 4), (4, 4), (8, 8)]
    sweep_bits = [(1, 2), (1, 3), (1, 4), (2, 2)]
    fc_shapes = [(4096, 9216), (4096, 4096), (1000, 4096), (4096, 25088)]
    fc_bits = [(1, 2), (2, 2)]
    batches = [8, 256]
    if args.bits:
        from apnumba.precision import parse_wa

        wanted = {(parse_wa(b)[0].bits, parse_wa(b)[1].bits) for b in args.bits}
        large_bits = [b for b in large_bits if b in wanted] or sorted(wanted)
        sweep_bits = [b for b in sweep_bits if b in wanted] or sorted(wanted)
        fc_bits = sorted(wanted)
    if args.batch:
        batches = args.batch
    # (name, p, q, M, N, K, autotune?, shape whose tile is used): the sweep shares one tile per bit width
    # (the one for its largest size) and batch-8 layers take the model's tile, to keep compiles few.
    cases = [(f"large {big}^3", p, q, big, big, big, True, None) for p, q in large_bits]
    sizes = [128, 512, 1024] if args.quick else [128, 256, 384, 512, 640, 768, 896, 1024]
    cases += [("APNN-TC sweep", p, q, 64, n, n, n == sizes[-1], (64, sizes[-1], sizes[-1]))
              for p, q in sweep_bits for n in sorted(sizes, reverse=True)]
    if not args.quick:
        cases += [(f"FC batch {bt}", p, q, m, bt, k, bt >= 64, None) for p, q in fc_bits for bt in batches for m, k in fc_shapes]
    return cases


def section_apmm(args, report):
    from numba import cuda

    torch = torch_or_none()
    stream = cuda.stream()
    rows = []
    cases = apmm_cases(args)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("apmm", total=len(cases))
        for name, p, q, M, N, K, tune, tile_shape in cases:
            progress.update(task, description=f"apmm {name} w{p}a{q} {M}x{N}x{K}")
            rows.append(_apmm_case(name, p, q, M, N, K, args, torch, stream, tune, tile_shape))
            progress.advance(task)
    peak = report["peak_tops"]
    for r in rows:
        r["bit_tops_over_peak"] = r["bit_tops"] / peak
    report["apmm"] = rows
    table = Table(title=f"APMM on {report['device']}: Y = W (MxK, p bits) . X (NxK, q bits), int32 out")
    cols = ["case", "bits", "M x N x K", "tile", "GPU us", "launch us", "apmm() us", "logical TOPS", "bit-TOPS", "% of peak"]
    if torch is not None:
        cols += ["torch fp16 us", "torch int8 us", "vs fp16"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("case", "bits", "tile") else "right")
    for r in rows:
        cells = [r["case"], r["bits"], f"{r['M']}x{r['N']}x{r['K']}", r["tile"], f"{r['gpu_us']:.2f}",
                 f"{r['python_us']:.1f}", f"{r['apmm_call_us']:.1f}", f"{r['logical_tops']:,.0f}", f"{r['bit_tops']:,.0f}",
                 f"{100 * r['bit_tops_over_peak']:.1f}%"]
        if torch is not None:
            i8 = r.get("torch_int8_us")
            cells += [f"{r['torch_fp16_us']:.2f}", f"{i8:.2f}" if i8 else "n/a", f"{r['torch_fp16_us'] / r['gpu_us']:.1f}x"]
        table.add_row(*cells)
    console.print(table)
    console.print("% of peak = bit-TOPS / measured b1 mma.sync peak.  GPU us: CUDA graph of many calls, event-timed.\n"
                  "launch us: Python wall time of a prepared launch (prepare_apmm); apmm() us: the whole checked call.")


RESNET18_CONVS = [  # (name, C, K, kernel, stride, padding, input size) - ImageNet 224, true shapes
    ("conv1 7x7/2", 3, 64, 7, 2, 3, 224),
    ("layer1 3x3", 64, 64, 3, 1, 1, 56),
    ("layer2 3x3/2", 64, 128, 3, 2, 1, 56),
    ("layer2 3x3", 128, 128, 3, 1, 1, 28),
    ("layer2 down 1x1/2", 64, 128, 1, 2, 0, 56),
    ("layer3 3x3/2", 128, 256, 3, 2, 1, 28),
    ("layer3 3x3", 256, 256, 3, 1, 1, 14),
    ("layer3 down 1x1/2", 128, 256, 1, 2, 0, 28),
    ("layer4 3x3/2", 256, 512, 3, 2, 1, 14),
    ("layer4 3x3", 512, 512, 3, 1, 1, 7),
    ("layer4 down 1x1/2", 256, 512, 1, 2, 0, 14),
]


def _conv_case(name, p, q, N, C, K, k, stride, padding, size, torch, stream):
    from numba import cuda

    from apnumba import reference as R
    from apnumba.conv import PackedConvWeight, prepare_apconv
    from apnumba.graph import gpu_time_per_call
    from apnumba.packed import PackedTensor
    from apnumba.precision import parse_wa

    rng = np.random.default_rng(p * 10 + q)
    pw, px = parse_wa(f"w{p}a{q}")
    x = PackedTensor.from_codes(R.random_codes(rng, (N, size, size, C), px), px)
    w = PackedConvWeight.from_codes(R.random_codes(rng, (K, k, k, C), pw), pw)
    OH = R.conv_output_size(size, k, stride, padding)
    y = cuda.device_array((N, OH, OH, K), np.int32)
    run = prepare_apconv(x, w, stride, padding, out=y, stream=stream)
    run()
    stream.synchronize()
    logical = 2.0 * N * OH * OH * K * C * k * k
    gpu_us = gpu_time_per_call(stream, run, calls=calls_for(logical * p * q / 6e15 * 1e6), replays=3)
    row = {"case": name, "bits": f"w{p}a{q}", "batch": N, "C": C, "K": K, "kernel": k, "stride": stride,
           "size": size, "tile": run.config.short(), "gpu_us": gpu_us,
           "logical_tops": logical / gpu_us / 1e6, "bit_tops": logical * p * q / gpu_us / 1e6}
    if torch is not None:
        torch.backends.cudnn.benchmark = True
        a = torch.randn(N, C, size, size, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(C, K, k, stride, padding, bias=False).cuda().half().to(memory_format=torch.channels_last)
        with torch.no_grad():
            row["torch_fp16_us"] = torch_gpu_time(torch, lambda: conv(a), calls=calls_for(logical / 5e14 * 1e6))
    return row


def section_conv(args, report):
    """APConv: the APNN-TC sweep, ResNet-18's convolutions, and what the fused epilogue saves."""
    from numba import cuda

    torch = torch_or_none()
    stream = cuda.stream()
    bits = [(1, 2), (1, 3), (1, 4), (2, 2)]
    if args.bits:
        from apnumba.precision import parse_wa

        bits = sorted({(parse_wa(b)[0].bits, parse_wa(b)[1].bits) for b in args.bits})
    sizes = [128, 512, 1024] if args.quick else [128, 256, 512, 1024, 2048]
    cases = [("APNN-TC sweep", p, q, 1, c, c, 3, 1, 1, 16) for p, q in bits for c in sizes]
    batches = args.batch or ([8] if args.quick else [8, 256])
    res_bits = [b for b in bits if b in ((1, 2), (2, 2))] or bits[:1]
    convs = RESNET18_CONVS[:4] if args.quick else RESNET18_CONVS
    cases += [(f"ResNet-18 {name}", p, q, bt, c, k_, k, st, pad, size)
              for p, q in res_bits for bt in batches for name, c, k_, k, st, pad, size in convs]
    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("conv", total=len(cases))
        for name, p, q, N, C, K, k, st, pad, size in cases:
            progress.update(task, description=f"conv {name} w{p}a{q} batch {N}")
            rows.append(_conv_case(name, p, q, N, C, K, k, st, pad, size, torch, stream))
            progress.advance(task)
    peak = report["peak_tops"]
    for r in rows:
        r["bit_tops_over_peak"] = r["bit_tops"] / peak
    report["conv"] = rows
    table = Table(title=f"APConv on {report['device']} (int32 NHWC out; weights p bits, activations q bits)")
    cols = ["case", "bits", "batch", "C->K", "kxk/s", "input", "tile", "GPU us", "logical TOPS", "bit-TOPS", "% of peak"]
    if torch is not None:
        cols += ["torch fp16 us", "vs fp16"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("case", "bits", "tile") else "right")
    for r in rows:
        cells = [r["case"], r["bits"], str(r["batch"]), f"{r['C']}->{r['K']}", f"{r['kernel']}/{r['stride']}",
                 str(r["size"]), r["tile"], f"{r['gpu_us']:.2f}", f"{r['logical_tops']:,.0f}", f"{r['bit_tops']:,.0f}",
                 f"{100 * r['bit_tops_over_peak']:.1f}%"]
        if torch is not None:
            cells += [f"{r['torch_fp16_us']:.2f}", f"{r['torch_fp16_us'] / r['gpu_us']:.1f}x"]
        table.add_row(*cells)
    console.print(table)
    report["fusion"] = _fusion_worth(stream, batch=8 if args.quick else 256)


def _fusion_worth(stream, batch):
    """One ResNet-18 layer (layer3 3x3, 256->256 at 14x14, w1a2): fused epilogue vs int32 out + a requantize pass."""
    from numba import cuda

    from apnumba import ops, reference as R
    from apnumba.conv import PackedConvWeight, prepare_apconv
    from apnumba.graph import gpu_time_per_call
    from apnumba.packed import PackedTensor

    rng = np.random.default_rng(5)
    N, C, K, size = batch, 256, 256, 14
    x = PackedTensor.from_codes(R.random_codes(rng, (N, size, size, C), "u2"), "u2")
    w = PackedConvWeight.from_codes(R.random_codes(rng, (K, 3, 3, C), "b1"), "b1")
    scale_host, bias_host = np.full(K, 0.01, np.float32), np.zeros(K, np.float32)
    scale, bias = cuda.to_device(scale_host), cuda.to_device(bias_host)
    packed = PackedTensor.empty((N * size * size, K), "u2")
    # host constants, as networks give them: the fused epilogue runs as integer thresholds
    fused = prepare_apconv(x, w, 1, 1, out=packed, scale=scale_host, bias=bias_host, relu=True, stream=stream)
    y = cuda.device_array((N, size, size, K), np.int32)
    conv_only = prepare_apconv(x, w, 1, 1, out=y, stream=stream)

    def unfused():
        conv_only()
        ops.requantize(y, scale, bias, packed, relu=True, stream=stream)

    t_fused = gpu_time_per_call(stream, fused, calls=20, replays=3)
    t_unfused = gpu_time_per_call(stream, unfused, calls=20, replays=3)
    pixels = N * size * size
    packed_bytes = 2 * pixels * 32 + 4 * pixels  # 2 planes x 256 channels (32 bytes) + row sums
    out = {"layer": "ResNet-18 layer3 3x3 256->256 @14x14, w1a2", "batch": N, "fused_us": t_fused,
           "unfused_us": t_unfused, "fused_bytes_out": packed_bytes,
           "unfused_bytes": 4 * pixels * K * 2 + packed_bytes}  # int32 written, read back, then packed
    table = Table(title="What the fused epilogue saves")
    for c in ("layer", "batch", "fused us", "conv + requantize us", "bytes out fused", "bytes moved unfused"):
        table.add_column(c)
    table.add_row(out["layer"], str(N), f"{t_fused:.1f}", f"{t_unfused:.1f}", f"{packed_bytes / 1e6:.1f} MB",
                  f"{out['unfused_bytes'] / 1e6:.1f} MB")
    console.print(table)
    return out


def section_study(args, report):
    """Where does APMM lose to the peak?  Instruction-rate probes at the occupancies APMM runs at,
    then one shape (--shape, default w1a2 8192^3) on a grid of tile configurations."""
    from numba import cuda

    from apnumba.kernels import probe
    from apnumba.kernels.apmm import TileConfig
    from apnumba.matmul import prepare_apmm
    from apnumba.graph import gpu_time_per_call
    from apnumba.packed import PackedTensor
    from apnumba import reference as R
    from apnumba.precision import parse_wa

    sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
    out = cuda.device_array(16 * 1024 * sms, dtype=np.int32)
    table = Table(title="b1 mma rate vs occupancy (register-only loops)")
    for c in ("blocks x warps per SM", "independent mma per warp", "TOPS", "% of peak"):
        table.add_column(c, justify="right")
    probes = []
    for blocks_per_sm, warps, chains in [(1, 4, 16), (1, 8, 8), (1, 8, 16), (2, 8, 8), (2, 8, 16), (4, 8, 8)]:
        kernel = probe.peak_kernel("m16n8k256", "and", chains)
        grid = blocks_per_sm * sms
        kernel[grid, 32 * warps](4, 1, out)
        cuda.synchronize()
        iters = 4096 * 8 // chains
        start, stop = cuda.event(), cuda.event()
        start.record()
        kernel[grid, 32 * warps](iters, 1, out)
        stop.record()
        stop.synchronize()
        tops = grid * warps * iters * chains * probe.ops_per_mma("m16n8k256") / (cuda.event_elapsed_time(start, stop) * 1e-3) / 1e12
        probes.append({"warps_per_sm": warps * blocks_per_sm, "chains": chains, "tops": tops})
        table.add_row(f"{blocks_per_sm} x {warps}", str(chains), f"{tops:,.0f}", f"{100 * tops / report['peak_tops']:.0f}%")
    console.print(table)
    report["study_probes"] = probes

    bits, M, N, K = (args.shape or ["w1a2", "8192", "8192", "8192"])[0], *map(int, (args.shape or ["", 8192, 8192, 8192])[1:])
    pw, px = parse_wa(bits)
    rng = np.random.default_rng(0)
    W = PackedTensor.from_codes(R.random_codes(rng, (M, K), pw), pw)
    X = PackedTensor.from_codes(R.random_codes(rng, (N, K), px), px)
    y = cuda.device_array((M, N), np.int32)
    stream = cuda.stream()
    p, q = pw.bits, px.bits
    configs = [
        TileConfig(2, 4, 4, 4, 4, 0, 1, 2), TileConfig(2, 4, 4, 4, 3, 0, 1, 4), TileConfig(2, 4, 4, 2, 4, 0, 1, 4),
        TileConfig(2, 4, 2, 4, 4, 0, 1, 4), TileConfig(4, 4, 2, 4, 3, 0, 1, 4), TileConfig(4, 4, 2, 2, 4, 0, 1, 4),
        TileConfig(2, 2, 4, 4, 4, 0, 1, 4), TileConfig(4, 2, 2, 4, 4, 0, 1, 4), TileConfig(4, 2, 4, 4, 3, 0, 1, 4),
        TileConfig(2, 4, 4, 2, 3, 0, 1, 8), TileConfig(2, 4, 4, 2, 4),
        # grouped block order and streamed output: does keeping the operands in L2 close the gap?
        TileConfig(2, 4, 4, 4, 3, 0, 1, 4, raster=8), TileConfig(2, 4, 4, 4, 3, 0, 1, 4, raster=8, stream_out=True),
        TileConfig(2, 4, 4, 2, 4, raster=8, stream_out=True), TileConfig(2, 4, 4, 2, 4, raster=16, stream_out=True),
        TileConfig(2, 2, 4, 4, 4, 0, 1, 2, raster=8, stream_out=True),
    ]
    table = Table(title=f"tile study: w{pw}a{px} {M}x{N}x{K}")
    for c in ("tile", "threads", "mma/warp/step", "registers", "GPU us", "bit-TOPS", "% of peak"):
        table.add_column(c, justify="right")
    rows = []
    for cfg in configs:
        if cfg.mma_per_step(p, q) > 32 or cfg.threads > 512:
            continue
        try:
            run = prepare_apmm(W, X, out=y, config=cfg, stream=stream)
            us = gpu_time_per_call(stream, run, calls=3, replays=3)
        except Exception as e:  # a configuration the card cannot run (registers, shared memory)
            console.print(f"{cfg.short()}: {str(e).splitlines()[0][:100]}")
            continue
        res = run.compiled.resources() or {}
        bt = 2.0 * M * N * K * p * q / us / 1e6
        rows.append({"tile": cfg.short(), "us": us, "bit_tops": bt, **res})
        table.add_row(cfg.short(), str(cfg.threads), str(cfg.mma_per_step(p, q)), str(res.get("registers")),
                      f"{us:.1f}", f"{bt:,.0f}", f"{100 * bt / report['peak_tops']:.1f}%")
    console.print(table)
    report["study_tiles"] = rows



# ---------------------------------------------------------------- nets


def torch_twin(model):
    """The same network in torch.nn (random float weights; only the shapes matter for timing)."""
    import torch.nn as nn

    from apnumba.layers import modules as L

    class Block(nn.Module):
        def __init__(self, b):
            super().__init__()
            c1, c2 = b.conv1, b.conv2
            self.body = nn.Sequential(
                nn.Conv2d(c1.in_channels, c1.out_channels, 3, c1.stride, 1, bias=False), nn.BatchNorm2d(c1.out_channels),
                nn.ReLU(), nn.Conv2d(c2.in_channels, c2.out_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(c2.out_channels))
            self.down = nn.Identity() if b.downsample is None else nn.Sequential(
                nn.Conv2d(c1.in_channels, c1.out_channels, 1, c1.stride, bias=False), nn.BatchNorm2d(c1.out_channels))

        def forward(self, x):
            return (self.body(x) + self.down(x)).relu()

    out = []
    for layer in model.layers:
        if isinstance(layer, L.Conv2d):
            out.append(nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                                 bias=layer.bias is not None))
        elif isinstance(layer, L.Linear):
            out.append(nn.Linear(layer.in_features, layer.out_channels, bias=layer.bias is not None))
        elif isinstance(layer, L.BatchNorm2d):
            out.append(nn.BatchNorm2d(layer.num_features))
        elif isinstance(layer, L.ReLU):
            out.append(nn.ReLU())
        elif isinstance(layer, L.MaxPool2d):
            out.append(nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding))
        elif isinstance(layer, L.AvgPool2d):
            out.append(nn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding))
        elif isinstance(layer, L.Flatten):
            out.append(nn.Flatten())
        elif isinstance(layer, L.BasicBlock):
            out.append(Block(layer))
        else:
            raise TypeError(f"no torch twin for {type(layer).__name__}")
    return nn.Sequential(*out)


def _net_case(name, bits, N, size, args, torch, per_layer):
    from numba import cuda

    from apnumba.layers import Network
    from apnumba.layers.models import MODELS

    model = MODELS[name][0](bits, apnn_convention=args.apnn_convention)
    net = Network(model, (N, 3, size, size))
    x = np.random.default_rng(0).standard_normal((N, 3, size, size)).astype(np.float32)
    net.forward(x)  # compile and warm every step
    net.capture()
    x_dev = cuda.to_device(x)
    net.forward(x_dev)
    times = []
    for _ in range(5 if args.quick else 20):  # GPU time of one pass: events around one graph replay
        start, stop = cuda.event(), cuda.event()
        start.record(net.stream)
        net._graph.replay()
        stop.record(net.stream)
        stop.synchronize()
        times.append(1e3 * cuda.event_elapsed_time(start, stop))
    gpu_us = float(np.median(times))
    calls = 50
    t0 = time.perf_counter()
    for _ in range(calls):  # what Python costs per pass: the input copy and one graph launch
        net.forward(net.input, sync=False)
    py_us = (time.perf_counter() - t0) / calls * 1e6
    net.stream.synchronize()
    ops = sum(s.ops for s in net.steps)
    row = {"model": name, "bits": bits, "batch": N, "precisions": model.precisions, "gpu_us": gpu_us,
           "images_per_s": N / gpu_us * 1e6, "python_us_per_pass": py_us, "logical_gops": ops / 1e9,
           "steps": len(net.steps)}
    if per_layer:
        row["layers"] = [{"step": n, "gpu_us": us, "logical_tops": (o / us / 1e6 if o else 0.0), "side_stream": step.side}
                         for (n, us, o), step in zip(net.layer_times(repeats=5), net.steps)]
    if torch is not None:
        torch.backends.cudnn.benchmark = True
        tm = torch_twin(model).cuda().half().eval().to(memory_format=torch.channels_last)
        a = torch.randn(N, 3, size, size, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
        with torch.no_grad():
            row["torch_fp16_us"] = torch_gpu_time(torch, lambda: tm(a), calls=5, replays=5)
        del tm, a
        torch.cuda.empty_cache()
    return row


def section_nets(args, report):
    """Whole networks: AlexNet, APNN-TC's VGG-variant, ResNet-18 - latency, images/s, per-layer time."""
    from apnumba.layers.models import MODELS

    torch = torch_or_none()
    bits = args.bits or (["w1a2"] if args.quick else ["w1a2", "w2a2"])
    batches = args.batch or ([8] if args.quick else [8, 256])
    names = args.models or list(MODELS)
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; expected some of {sorted(MODELS)}")
    cases = [(name, b, N) for name in names for b in bits for N in batches]
    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("nets", total=len(cases))
        for name, b, N in cases:
            progress.update(task, description=f"{name} {b} batch {N}")
            first = b == bits[0] and N == batches[0]
            rows.append(_net_case(name, b, N, MODELS[name][1], args, torch, per_layer=first))
            progress.advance(task)
    report["nets"] = rows
    conv = "every layer at wXaY (APNN-TC convention)" if args.apnn_convention else "first and last layers 8-bit"
    table = Table(title=f"Networks on {report['device']} (224x224, one CUDA graph a pass; {conv})")
    cols = ["model", "bits", "batch", "GPU us / pass", "images/s", "Python us / pass", "logical GOP"]
    if torch is not None:
        cols += ["torch fp16 us", "speed-up"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("model", "bits") else "right")
    for r in rows:
        cells = [r["model"], r["bits"], str(r["batch"]), f"{r['gpu_us']:,.1f}", f"{r['images_per_s']:,.0f}",
                 f"{r['python_us_per_pass']:.1f}", f"{r['logical_gops']:,.1f}"]
        if torch is not None:
            cells += [f"{r['torch_fp16_us']:,.1f}", f"{r['torch_fp16_us'] / r['gpu_us']:.2f}x"]
        table.add_row(*cells)
    console.print(table)
    for r in rows:
        if "layers" in r:
            console.print(step_table(r))


def step_table(r):
    """A network's per-step times: each step alone; the pass overlaps the side stream's steps with the main one's."""
    t = Table(title=f"{r['model']} {r['bits']} batch {r['batch']}: per step (each alone, GPU time from a graph of its calls)")
    for c in ("step", "GPU us", "share", "logical TOPS"):
        t.add_column(c, justify="left" if c == "step" else "right")
    total = sum(x["gpu_us"] for x in r["layers"]) or 1.0
    for x in r["layers"]:
        name = x["step"] + (" (side stream)" if x.get("side_stream") else "")
        t.add_row(name, f"{x['gpu_us']:.1f}", f"{100 * x['gpu_us'] / total:.0f}%",
                  f"{x['logical_tops']:,.0f}" if x["logical_tops"] else "")
    t.caption = (f"the steps alone sum to {total:,.1f} us, the pass took {r['gpu_us']:,.1f} us: side-stream steps "
                 "run beside the main stream's")
    return t


def cpu_demo():
    """No GPU: show that the emulated product equals integer arithmetic, on the numpy reference."""
    from apnumba import reference as R
    from apnumba.device import NO_GPU_HELP
    from apnumba.precision import parse_wa

    console.print(f"[bold yellow]No usable CUDA GPU here.[/] {NO_GPU_HELP}")
    console.print("Running a small correctness demo of the bit-plane algebra on the CPU reference instead.\n")
    rng = np.random.default_rng(0)
    table = Table(title="apmm reference (packed planes, AND, popc) vs integer W @ X.T")
    for c in ("bits", "M x N x K", "plane pairs", "equal"):
        table.add_column(c)
    ok = True
    for spec in ("w1a1", "w1a2", "w2a2", "wb1ab1", "w4a4", "w8a8"):
        pw, px = parse_wa(spec)
        w = R.random_codes(rng, (33, 300), pw)
        x = R.random_codes(rng, (17, 300), px)
        same = bool((R.apmm(w, x, pw, px) == R.matmul_int(w, x)).all())
        ok &= same
        table.add_row(f"w{pw}a{px}", "33x17x300", str(pw.bits * px.bits), "yes" if same else "[red]NO[/]")
    console.print(table)
    return ok


SECTIONS = {"peak": section_peak, "apmm": section_apmm, "conv": section_conv, "nets": section_nets,
            "study": section_study}
PLANNED = {}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", help=f"sections to run (default all): {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, no autotuning (about a minute)")
    parser.add_argument("--json", metavar="FILE", help="write every figure, the card, versions and the peak to FILE")
    parser.add_argument("--bits", nargs="+", metavar="wXaY", help="bit widths to run, e.g. w1a2 w2a2")
    parser.add_argument("--batch", nargs="+", type=int, metavar="B", help="batch sizes for the FC / network cases")
    parser.add_argument("--models", nargs="+", metavar="NAME", help="networks of the 'nets' section (default all): "
                        "alexnet vgg resnet18")
    parser.add_argument("--apnn-convention", action="store_true",
                        help="nets: quantize every layer at wXaY, first and last too (as APNN-TC measured)")
    parser.add_argument("--shape", nargs=4, metavar=("wXaY", "M", "N", "K"), help="the shape of the 'study' section")
    args = parser.parse_args(argv)

    unknown = [s for s in args.sections if s not in SECTIONS and s not in PLANNED]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; expected some of {list(SECTIONS) + list(PLANNED)}")
    for s in args.sections:
        if s in PLANNED:
            console.print(f"[yellow]Section '{s}' ({PLANNED[s]}) is not implemented yet; skipping it.[/]")
    wanted = [s for s in (args.sections or ["peak", "apmm", "conv", "nets"]) if s in SECTIONS]

    from apnumba.device import device_name, gpu_available

    if not gpu_available():
        return 0 if cpu_demo() else 1

    report = {"device": device_name(), "versions": versions(), "argv": sys.argv[1:], "quick": args.quick}
    console.print(f"[bold]apnumba bench[/] on {report['device']}  ({', '.join(f'{k} {v}' for k, v in report['versions'].items())})")
    section_peak(args, report)  # every ratio needs the peak of this run
    for name in wanted:
        if name != "peak":
            SECTIONS[name](args, report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
