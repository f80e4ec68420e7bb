"""Network layers (torch.nn names and argument order) and the planner that runs them on the GPU."""

from .modules import (  # noqa: F401
    Act, AvgPool2d, BasicBlock, BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, Module, ReLU, Sequential,
)
from .network import Network, PlanError  # noqa: F401
from .io import ModelFileError, load, save  # noqa: F401


_TORCH_PARTS = {"from_torch": "importer", "compare": "importer", "UnsupportedModelError": "importer",
                "QuantizerMismatch": "importer", "qat": None}


def __getattr__(name):
    """The torch importer and QAT modules load on first use: torch is an optional extra."""
    if name not in _TORCH_PARTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    if _TORCH_PARTS[name] is None:
        return importlib.import_module(f"{__name__}.{name}")
    return getattr(importlib.import_module(f"{__name__}.{_TORCH_PARTS[name]}"), name)
