"""Network layers (torch.nn names and argument order) and the planner that runs them on the GPU."""

from .modules import (  # noqa: F401
    Act, AvgPool2d, BasicBlock, BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, Module, ReLU, Sequential,
)
from .network import Network, PlanError  # noqa: F401
from .io import ModelFileError, load, save  # noqa: F401
