"""Network: plan a Sequential once, then run forward passes with no allocation and no host sync.

Planning walks the layers and turns them into steps, each one launch (or a view):

    first Conv2d      8-bit (bytes): quantize the float image into NHWC code bytes, then the layer's
                      convolution; bit planes: pack the receptive fields, then a 1x1 convolution
    Conv2d / Linear   one apconv; a following BatchNorm2d, ReLU, the block's residual, a 2x2 stride-2
                      MaxPool2d and the next layer's quantizer are folded into its epilogue, which packs
                      bit planes, or code bytes where the next layer runs on int8 (an 8-bit last layer);
                      the last layer writes float32
    BasicBlock        [downsample conv (+BN)] ; conv1 (+BN, ReLU) ; conv2 (+BN, + shortcut, ReLU) - the
                      downsample on a second stream, beside conv1 (small grids share the GPU); conv2 waits for both
    MaxPool2d / AvgPool2d / Flatten    the packed-tensor ops (other pools; Flatten is a view)

Kernels that add into their output's row sums (pooling, convolutions whose pixels span several blocks)
take them from one ``RowSumArena``, zeroed once at the start of a pass on the side stream (beside the
input's quantization) - not a memset before each.

Every step also has its numpy twin built from the same float32 epilogue constants, so
:meth:`Network.reference` computes the logits the GPU must produce, bit for bit (integer pipeline)
and exactly (the float32 last layer: the same two roundings).  :meth:`Network.capture` records the
whole forward pass as one CUDA graph: a pass then costs one launch of Python.
"""

from dataclasses import dataclass, field

import numpy as np
from numba import cuda

from .. import ops, reference
from ..conv import PackedConvWeight, prepare_apconv
from ..device import is_device_array, require_gpu, zero_fill
from ..graph import CudaGraph, gpu_time_per_call
from ..packed import PackedTensor
from ..precision import quantize
from .modules import Act, AvgPool2d, BasicBlock, BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential


@dataclass
class Step:
    name: str
    run: object  # () -> None: launches on the network's stream
    ref: object  # (input codes, results so far) -> output codes, in numpy
    src: object  # the tensor the step reads (results are keyed by tensor identity)
    out: object  # the tensor it writes
    ops: float = 0.0  # logical ops (2 * MACs) of a product
    extra: dict = field(default_factory=dict)
    side: bool = False  # launches on the side stream, forked from the main one where the pass stands
    join: bool = False  # the main stream first waits for the side stream's last step


class RowSumArena:
    """The row sums of a pass's outputs that kernels add into (pools; convolutions whose pixels span
    several blocks), handed out from a few int32 buffers so that one memset a buffer at the start of a
    pass zeroes them all (a memset node before each such launch cost ~1 us of graph time: ResNet-18 at
    batch 8 ran twelve).  Each tensor gets rows of its own: two steps of one pass adding into the same
    rows would leave their total."""

    CHUNK = 1 << 20  # int32 row sums a buffer (more where one tensor needs more)

    def __init__(self):
        self.buffers, self.views, self.used = [], [], 0

    def take(self, rows):
        """A zero-at-each-pass int32 (rows,) device view of its own."""
        if not self.buffers or self.used + rows > self.buffers[-1].size:
            self.buffers.append(cuda.device_array(max(rows, self.CHUNK), np.int32))
            self.used = 0
        view = self.buffers[-1][self.used:self.used + rows]
        self.used += rows
        self.views.append(view)
        return view

    def zero(self, stream):
        for buffer in self.buffers:
            zero_fill(buffer, stream)


class PlanError(ValueError):
    """The model cannot be planned for this input (layers that do not chain, unsupported order, memory)."""


@dataclass
class PlannedTensor:
    """What a CPU plan knows of a packed tensor: rows x K codes of a precision, and NHWC geometry."""

    shape: tuple
    precision: object
    zero_point: int = 0
    image: tuple = None
    packing: str = "bits"

    @property
    def K(self):
        return self.shape[1]


class Network:
    """Plan ``model`` (a Sequential) for input batches of ``input_shape`` = (N, C, H, W) (or (N, H, W, C)
    with layout "NHWC"), quantized as ``input_act`` (default: the model's ``input_act`` if it has one - an
    imported model does - else 8-bit signed, scale 4/127).  ``tile`` forces one TileConfig on every product
    (tests, studies); by default each layer takes the cost model's.

    ``device="cpu"`` plans without a GPU: the same steps, checks and float32 epilogue constants, and
    ``forward`` computes the logits with the numpy twin (what the GPU produces, bit for bit; slow)."""

    def __init__(self, model, input_shape, layout="NCHW", input_act=None, stream=None, tile=None, device="cuda"):
        if device not in ("cuda", "cpu"):
            raise ValueError(f"device: expected 'cuda' or 'cpu', got {device!r}")
        self.on_gpu = device == "cuda"
        if self.on_gpu:
            require_gpu()
        if not isinstance(model, Sequential):
            raise TypeError(f"model: expected a Sequential, got {type(model).__name__}")
        if layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout: expected 'NCHW' or 'NHWC', got {layout!r}")
        if len(input_shape) != 4 or min(input_shape) < 1:
            raise ValueError(f"input_shape: expected 4 positive sizes, got {input_shape}")
        self.model, self.layout = model, layout
        self.input_shape = tuple(int(v) for v in input_shape)
        self.input_act = input_act or getattr(model, "input_act", None) or Act("s8", 4.0 / 127)
        self.tile = tile
        self.steps = []
        if self.on_gpu:
            self.stream = stream or cuda.stream()
            self.side_stream = cuda.stream()
            self._fork, self._join = cuda.event(), cuda.event()  # (in a captured pass: graph edges)
            self._check_memory()
            self.input = cuda.device_array(self.input_shape, np.float32)
        else:
            self.stream = self.side_stream = None
            self.input = PlannedTensor(self.input_shape, None)
        self._plan()
        self._graph = None

    # ---------------------------------------------------------------- planning

    def _check_memory(self):
        """Refuse early when the buffers could not fit (a rough upper bound: int32 per activation element)."""
        free, _ = cuda.current_context().get_memory_info()
        N = self.input_shape[0]
        C, H, W = (self.input_shape[1:] if self.layout == "NCHW" else (self.input_shape[3], *self.input_shape[1:3]))
        need = 4 * N * C * H * W
        for m in self.model.modules():
            if isinstance(m, (Conv2d, Linear)):
                need += 4 * m.weight.size // 8 * m.weight_precision.bits + 64 * m.out_channels
        if need > free:
            raise PlanError(f"the plan needs about {need / 2**30:.1f} GiB of GPU memory, {free / 2**30:.1f} GiB free")

    def _plan(self):
        layers = self.model.layers
        if not layers or not isinstance(layers[0], Conv2d):
            raise PlanError("model: the first layer must be a Conv2d (it quantizes and packs the float image)")
        C = self.input_shape[1] if self.layout == "NCHW" else self.input_shape[3]
        if layers[0].in_channels != C:
            raise PlanError(f"layer 0 (Conv2d): expects {layers[0].in_channels} input channels, the input has {C}")
        self.cur = None  # (PackedTensor, Act) flowing between steps
        self.flatten_chw = None
        self.rowsums = RowSumArena()
        i = 0
        while i < len(layers):
            layer = layers[i]
            last = i == len(layers) - 1
            if isinstance(layer, (Conv2d, Linear)):
                name = f"{i}:{type(layer).__name__}"
                bn = layers[i + 1] if i + 1 < len(layers) and isinstance(layers[i + 1], BatchNorm2d) else None
                j = i + 1 + (bn is not None)
                relu = j < len(layers) and isinstance(layers[j], ReLU)
                i = j + relu
                nxt = layers[i] if i < len(layers) else None
                pool = (isinstance(layer, Conv2d) and isinstance(nxt, MaxPool2d)
                        and (nxt.kernel_size, nxt.stride, nxt.padding) == (2, 2, 0))
                if pool:  # a 2x2/2 max pool after the conv goes into its epilogue (max commutes with requantize)
                    name, i = f"{name}+{i}:MaxPool2d", i + 1
                consumer = layers[i] if i < len(layers) else None
                self._product(layer, bn, relu, i >= len(layers), name, pool=pool,
                              out_packing=self._packing_for(consumer, layer.out_act))
                continue
            if isinstance(layer, BasicBlock):
                self._block(layer, f"{i}:BasicBlock", last)
            elif isinstance(layer, MaxPool2d):
                self._pool(layer, f"{i}:MaxPool2d")
            elif isinstance(layer, AvgPool2d):
                self._pool(layer, f"{i}:AvgPool2d")
            elif isinstance(layer, Flatten):
                self._flatten(f"{i}:Flatten")
            else:
                raise PlanError(f"layer {i} ({type(layer).__name__}): only allowed right after a Conv2d / Linear "
                                "(BatchNorm2d, then ReLU) - it is folded into that layer's epilogue")
            i += 1
        if isinstance(self.cur, tuple):
            raise PlanError("model: the last layer must be a Conv2d or Linear (it writes the float32 logits)")
        self.logits = self.cur
        # A pass starts by zeroing the arena on the side stream (beside the input's quantization and the
        # first product); the main stream's first step that adds into it waits for that (side steps
        # follow it on their stream).
        users = [s for s in self.steps
                 if not s.side and any(getattr(s.out, "rowsum", None) is v for v in self.rowsums.views)]
        if users:
            users[0].join = True

    @staticmethod
    def _packing_for(consumer, act):
        """How a product's output is packed: code bytes where the next layer is a product that runs
        cheaper on the int8 tensor cores (an 8-bit last layer: 1 mma per 32 bytes, not 64 plane pairs
        per 256 bits), else bit planes."""
        if act is None or not isinstance(consumer, (Conv2d, Linear)):
            return "bits"
        K = consumer.in_features if isinstance(consumer, Linear) else consumer.kernel_size ** 2 * consumer.in_channels
        return "bytes" if reference.bytes_pay(consumer.weight_precision, act.precision, K) else "bits"

    def _epilogue(self, layer, bn, in_act, out_act, residual_act=None):
        """float32 (scale, bias[, residual scale]) of a product's epilogue, folded in float64 once."""
        a = layer.weight_scale * in_act.scale
        b = layer.bias if layer.bias is not None else np.zeros(layer.out_channels)
        if bn is not None:
            g, h = bn.fold()
            a, b = g * a, g * b + h
        if out_act is None:
            return a.astype(np.float32), b.astype(np.float32), None
        res = None if residual_act is None else np.float32(residual_act.scale / out_act.scale)
        return (a / out_act.scale).astype(np.float32), (b / out_act.scale).astype(np.float32), res

    def _product(self, layer, bn, relu, final, name, residual=None, pool=False, out_packing="bits", side=False,
                 join=False):
        """One Conv2d / Linear with its folded epilogue; returns the output (PackedTensor, Act).  ``side``:
        it launches on the side stream (Step.side); ``join``: it waits for the side stream first."""
        if final and relu:
            raise PlanError(f"{name}: the last layer writes float32 logits; a ReLU after it is not supported")
        N = self.input_shape[0]
        first = self.cur is None
        if isinstance(layer, Linear):
            if self.cur is None or self.cur[0].image is None or tuple(self.cur[0].image[1:]) != (1, 1):
                raise PlanError(f"{name}: a Linear needs a flattened input (Flatten first)")
            x, act = self.cur
            features = x.K
            w_codes = layer.weight
            if self.flatten_chw is not None:  # the first Linear after Flatten: apnumba's (h, w, c-padded) order
                C, H, W = self.flatten_chw
                if layer.in_features != C * H * W:
                    raise PlanError(f"{name}: expects {layer.in_features} features, the flattened input has {C * H * W}")
                w_codes = reference.flatten_weight_columns(w_codes, C, H, W, layer.weight_precision)
                self.flatten_chw = None
            elif layer.in_features != features:
                raise PlanError(f"{name}: expects {layer.in_features} features, the input has {features}")
            w_codes = w_codes.reshape(layer.out_channels, 1, 1, -1)
            ref_codes = layer.weight.reshape(layer.out_channels, 1, 1, -1)  # the reference flattens in torch's order
            stride, padding = 1, 0
            macs = N * layer.out_channels * layer.in_features
        else:
            if first:
                act = self.input_act
                features = layer.kernel_size ** 2 * layer.in_channels
                # int8 bytes where the int8 tensor cores issue fewer products than the plane pairs (an 8-bit
                # first layer: 1 mma per 32 features instead of 64 per 256): the image's bytes, read by the
                # layer's own convolution; else the receptive fields as bit planes for a 1x1 convolution.
                if reference.bytes_pay(layer.weight_precision, act.precision, features):
                    return self._first_bytes(layer, bn, relu, final, name, pool, out_packing)
                if self.on_gpu:
                    x = PackedTensor.from_patches(self.input, layer.kernel_size, layer.stride, layer.padding,
                                                  act.precision, act.scale, act.zero_point, self.layout)
                else:
                    H, W = self.input_shape[2:] if self.layout == "NCHW" else self.input_shape[1:3]
                    OH = reference.conv_output_size(H, layer.kernel_size, layer.stride, layer.padding)
                    OW = reference.conv_output_size(W, layer.kernel_size, layer.stride, layer.padding)
                    x = PlannedTensor((N * OH * OW, features), act.precision, act.zero_point, (N, OH, OW))
                self.steps.append(Step(f"{name} (input pack)", lambda: PackedTensor.from_patches(
                    self.input, layer.kernel_size, layer.stride, layer.padding, out=x, layout=self.layout,
                    stream=self.stream), self._ref_patches(layer), self.input, x))
                w_codes = layer.weight.reshape(layer.out_channels, 1, 1, -1)  # (r, s, c) order = the patches'
                stride, padding = 1, 0
            else:
                x, act = self.cur
                if x.K != layer.in_channels:
                    raise PlanError(f"{name}: expects {layer.in_channels} input channels, the input has {x.K}")
                w_codes, stride, padding = layer.weight, layer.stride, layer.padding
            ref_codes = w_codes
            k = w_codes.shape[1]
            OH = reference.conv_output_size(x.image[1], k, stride, padding)
            OW = reference.conv_output_size(x.image[2], k, stride, padding)
            macs = N * OH * OW * layer.out_channels * w_codes.shape[3] * k * k
        packing = getattr(x, "packing", "bits")
        weight = PackedConvWeight.from_codes(w_codes, layer.weight_precision, packing=packing) if self.on_gpu else None
        out_act = None if final else layer.out_act
        if out_act is None and not final:
            raise PlanError(f"{name}: needs out_act (how its output is quantized) unless it is the last layer")
        res_x, res_act = residual if residual is not None else (None, None)
        scale, bias, res_scale = self._epilogue(layer, bn, act, out_act, res_act)
        OH = reference.conv_output_size(x.image[1], w_codes.shape[1], stride, padding)
        OW = reference.conv_output_size(x.image[2], w_codes.shape[1], stride, padding)
        if pool:
            if final or OH < 2 or OW < 2:
                raise PlanError(f"{name}: a 2x2 max pool needs a hidden layer with at least 2x2 output pixels")
            OH, OW = OH // 2, OW // 2
        if not self.on_gpu:
            launch = None
            out = PlannedTensor((N * OH * OW, layer.out_channels), None if final else out_act.precision,
                                0 if final else out_act.zero_point, (N, OH, OW), out_packing)
        elif final:
            launch = prepare_apconv(x, weight, stride, padding, scale=scale, bias=bias, stream=self.stream,
                                    config=self.tile)
            out = launch.out
        else:
            out = PackedTensor.empty((N * OH * OW, layer.out_channels), out_act.precision, out_act.scale,
                                     out_act.zero_point, packing=out_packing)
            launch = prepare_apconv(x, weight, stride, padding, out=out, scale=scale, bias=bias, relu=relu,
                                    residual=res_x, residual_scale=float(res_scale or 1.0),
                                    stream=self.side_stream if side else self.stream,
                                    pool="max" if pool else None, config=self.tile,
                                    rowsums=self.rowsums.take)
        ref = self._ref_product(ref_codes, stride, padding, act, scale, bias, relu, out_act, residual, res_scale, final)
        if pool:
            conv_ref = ref

            def ref(codes, results):  # the unfused order: requantize, then torch's MaxPool2d(2, 2) on the codes
                return reference.max_pool_codes(conv_ref(codes, results), 2, 2, 0)
        tile = " ".join(filter(None, [launch.config.short() if launch else "", "int8" if packing == "bytes" else ""]))
        self.steps.append(Step(name, launch, ref, x, out, 2.0 * macs, {"tile": tile}, side=side,
                               join=join))
        self.cur = out if final else (out, out_act)
        return self.cur

    def _first_bytes(self, layer, bn, relu, final, name, pool, out_packing):
        """A byte-packed first layer: quantize the image into NHWC code bytes (one word a pixel for <= 4
        channels), then the layer's own convolution reads them (one word a tap).  (ResNet-18 at batch 256
        on the H100: 154 us + a 978 us stem, where receptive fields gathered as bytes for a 1x1
        convolution took 1,953 + 825 us.)"""
        N = self.input_shape[0]
        C, H, W = (self.input_shape[1:] if self.layout == "NCHW" else (self.input_shape[3], *self.input_shape[1:3]))
        act = self.input_act
        if self.on_gpu:
            x = PackedTensor.from_image(self.input, act.precision, act.scale, act.zero_point, self.layout)
        else:
            x = PlannedTensor((N * H * W, C), act.precision, act.zero_point, (N, H, W), "bytes")
        self.steps.append(Step(f"{name} (input quantize)", lambda: PackedTensor.from_image(
            self.input, layout=self.layout, out=x, stream=self.stream), self._ref_image(), self.input, x))
        self.cur = (x, act)
        return self._product(layer, bn, relu, final, name, pool=pool, out_packing=out_packing)

    def _block(self, block, name, final):
        if final:
            raise PlanError(f"{name}: a BasicBlock cannot be the last layer")
        identity = self.cur
        shortcut = identity
        if block.downsample is not None:  # first, on the side stream: it needs only the block's input
            conv, bn = block.downsample.layers
            shortcut = self._product(conv, bn, False, False, f"{name}.downsample", side=True)
            self.cur = identity
        h = self._product(block.conv1, block.bn1, True, False, f"{name}.conv1")
        self.cur = h
        self._product(block.conv2, block.bn2, True, False, f"{name}.conv2", residual=shortcut,
                      join=block.downsample is not None)

    def _pool(self, layer, name):
        x, act = self.cur
        N = x.image[0]
        OH = reference.conv_output_size(x.image[1], layer.kernel_size, layer.stride, layer.padding)
        OW = reference.conv_output_size(x.image[2], layer.kernel_size, layer.stride, layer.padding)
        if isinstance(layer, MaxPool2d):
            out_act = act
            out = (ops.max_pool2d(x, layer.kernel_size, layer.stride, layer.padding, stream=self.stream)
                   if self.on_gpu else PlannedTensor((N * OH * OW, x.K), act.precision, act.zero_point, (N, OH, OW)))

            def run():
                ops.max_pool2d(x, layer.kernel_size, layer.stride, layer.padding, out=out, stream=self.stream,
                               zero_rowsum=False)

            def ref(codes, results):
                return reference.max_pool_codes(codes, layer.kernel_size, layer.stride, layer.padding)
        else:
            out_act = layer.out_act or act
            out = (PackedTensor.empty((N * OH * OW, x.K), out_act.precision, out_act.scale, out_act.zero_point)
                   if self.on_gpu else PlannedTensor((N * OH * OW, x.K), out_act.precision, out_act.zero_point,
                                                     (N, OH, OW)))

            def run():
                ops.avg_pool2d(x, layer.kernel_size, layer.stride, layer.padding, out=out, stream=self.stream,
                               zero_rowsum=False)

            multiplier = np.float32(act.scale / (layer.kernel_size ** 2 * out_act.scale))

            def ref(codes, results):
                return reference.avg_pool_codes(codes, layer.kernel_size, layer.stride, layer.padding, act.precision,
                                                act.zero_point, multiplier, out_act.precision, out_act.zero_point)
        if self.on_gpu:
            out.rowsum = self.rowsums.take(out.rows)
            run()
        self.steps.append(Step(name, run, ref, x, out))
        self.cur = (out, out_act)

    def _flatten(self, name):
        x, act = self.cur
        N, H, W = x.image
        self.flatten_chw = (x.K, H, W)
        try:
            ops.check_flattenable(x.precision, x.zero_point)
        except ValueError as e:
            raise PlanError(f"{name}: {e}") from None
        if self.on_gpu:
            flat = ops.flatten(x, stream=self.stream)  # a view of x's words; its row sums are recomputed per pass
        else:
            flat = PlannedTensor((N, H * W * 32 * -(-x.K // 32)), x.precision, x.zero_point)
        flat.image = (N, 1, 1)
        view = H * W == 1  # a global pooling's output: the row sums are x's own, nothing to launch

        def run():
            if not view:
                ops.flatten(x, out=flat, stream=self.stream)

        def ref(codes, results):
            return codes.transpose(0, 3, 1, 2).reshape(codes.shape[0], 1, 1, -1)  # torch's (c, h, w) order

        self.steps.append(Step(name, run, ref, x, flat, extra={"launches": not view}))
        self.cur = (flat, act)

    # ---------------------------------------------------------------- the numpy twins

    def _ref_image(self):
        def ref(x, results):
            nhwc = x.transpose(0, 2, 3, 1) if self.layout == "NCHW" else x
            return quantize(np.asarray(nhwc, np.float32), self.input_act.precision, self.input_act.scale,
                            self.input_act.zero_point)

        return ref

    def _ref_patches(self, layer):
        def ref(x, results):
            nhwc = x.transpose(0, 2, 3, 1) if self.layout == "NCHW" else x
            p = reference.patches(np.asarray(nhwc, np.float32), layer.kernel_size, layer.kernel_size, layer.stride,
                                  layer.padding)
            N = nhwc.shape[0]
            OH = reference.conv_output_size(nhwc.shape[1], layer.kernel_size, layer.stride, layer.padding)
            OW = reference.conv_output_size(nhwc.shape[2], layer.kernel_size, layer.stride, layer.padding)
            codes = quantize(p, self.input_act.precision, self.input_act.scale, self.input_act.zero_point)
            return codes.reshape(N, OH, OW, -1)

        return ref

    def _ref_product(self, w_codes, stride, padding, act, scale, bias, relu, out_act, residual, res_scale, final):
        residual_step = None if residual is None else residual[0]

        def ref(codes, results):
            y = reference.conv2d_int(codes, w_codes, stride, padding, act.zero_point, 0)
            K = w_codes.shape[0]
            if final:
                return y.astype(np.int32).astype(np.float32) * scale + bias
            res = None
            res_zp = 0
            if residual_step is not None:
                res = results[id(residual_step)].reshape(-1, K)
                res_zp = residual[1].zero_point
            q = reference.requantize(y.reshape(-1, K), scale, bias, out_act.precision, out_act.zero_point, relu, res,
                                     res_zp, res_scale if res_scale is not None else 1.0)
            return q.reshape(y.shape)

        return ref

    # ---------------------------------------------------------------- running

    def _check_input(self, x):
        if tuple(x.shape) != self.input_shape:
            raise ValueError(f"x: expected shape {self.input_shape} ({self.layout}), got {tuple(x.shape)}")
        if np.dtype(x.dtype) not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise TypeError(f"x: expected float32 or float16, got {np.dtype(x.dtype).name}")

    def _feed(self, x):
        if x is self.input:
            return
        self._check_input(x)
        if is_device_array(x):
            if np.dtype(x.dtype) != np.float32:
                raise TypeError("x: a device input must be float32 (or copy it into network.input yourself)")
            self.input.copy_to_device(x, stream=self.stream)
        else:
            self.input.copy_to_device(np.ascontiguousarray(x, np.float32), stream=self.stream)

    def forward(self, x, sync=True):
        """Logits (N, classes) as a float32 device array (the same buffer every pass); with device="cpu",
        a numpy array from the numpy twin."""
        if not self.on_gpu:
            self._check_input(x)
            return self.reference(np.asarray(x, np.float32))
        self._feed(x)
        if self._graph is not None:
            self._graph.replay()
        else:
            self._run(self.steps)
        if sync:
            self.stream.synchronize()
        return self.logits.reshape(self.input_shape[0], -1)

    __call__ = forward

    def _run(self, steps, alone=False):
        """Launch ``steps`` on the network's streams: a side step after the main stream's launches so far
        (the fork event), a joining step after the side stream's (the join event).  A whole pass first
        zeroes the row-sum arena on the side stream.  ``alone``: a step timed by itself - a side step is
        joined back at once, and nothing is zeroed (its sums grow; the next pass zeroes them)."""
        if not alone and self.rowsums.buffers:
            self._fork.record(self.stream)
            self._fork.wait(self.side_stream)
            self.rowsums.zero(self.side_stream)
            self._join.record(self.side_stream)
        for step in steps:
            if step.side:
                self._fork.record(self.stream)
                self._fork.wait(self.side_stream)
                step.run()
                self._join.record(self.side_stream)
                if alone:
                    self._join.wait(self.stream)
            else:
                if step.join and not alone:
                    self._join.wait(self.stream)
                step.run()

    def _require_gpu_plan(self, what):
        if not self.on_gpu:
            raise RuntimeError(f"{what}: this network was planned with device='cpu'; plan it with device='cuda'")

    def capture(self):
        """Record one forward pass (without the input copy) as a CUDA graph; later passes replay it."""
        self._require_gpu_plan("capture")
        self._run(self.steps)  # warm: everything compiled and allocated before the capture
        self.stream.synchronize()
        with CudaGraph(self.stream) as graph:  # the side stream's launches join it through the events
            self._run(self.steps)
        self._graph = graph
        return self

    def layer_times(self, repeats=10):
        """GPU microseconds of each step: ``repeats`` calls of the step alone captured in a CUDA graph,
        replayed and timed by events (so Python dispatch is not counted); [(name, us, logical ops)].
        A step that launches nothing (the flatten of 1x1 images) takes 0."""
        self._require_gpu_plan("layer_times")

        def us(step):
            if not step.extra.get("launches", True):
                return 0.0
            return gpu_time_per_call(self.stream, lambda: self._run([step], alone=True), calls=repeats, replays=3)

        return [(step.name, us(step), step.ops) for step in self.steps]

    def reference(self, x, intermediates=False):
        """The logits the GPU must produce, from numpy (same codes, same float32 epilogue constants).
        With ``intermediates``, also every step's output: [(step name, codes (N, H, W, C) or logits)]."""
        results = {id(self.input): np.asarray(x, np.float32)}
        for step in self.steps:
            results[id(step.out)] = step.ref(results[id(step.src)], results)
        logits = results[id(self.logits)].reshape(self.input_shape[0], -1)
        if intermediates:
            return logits, [(step.name, results[id(step.out)]) for step in self.steps]
        return logits

    def describe(self):
        return [(s.name, s.ops, s.extra.get("tile", "")) for s in self.steps]

