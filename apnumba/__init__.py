"""apnumba: arbitrary-precision neural networks on NVIDIA binary tensor cores, in pure-Python numba-cuda."""

from .device import AccumulatorOverflowError, NoGPUError, UnsupportedGPUError, gpu_available
from .conv import PackedConvWeight, apconv, prepare_apconv
from .kernels.apmm import TileConfig
from .matmul import apmm, matmul, prepare_apmm
from .packed import PackedTensor
from .precision import Encoding, Precision, dequantize, parse_wa, quantize

__all__ = [
    "AccumulatorOverflowError", "Encoding", "NoGPUError", "PackedConvWeight", "PackedTensor", "Precision", "TileConfig",
    "apconv", "prepare_apconv",
    "UnsupportedGPUError", "apmm", "prepare_apmm", "dequantize", "gpu_available", "matmul", "parse_wa", "quantize",
]
__version__ = "0.1.0"
