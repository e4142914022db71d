"""pitmpi: layer-parallel (parallel-in-time) training of residual networks with MPI.

Implements Parpas & Muir, "Predict Globally, Correct Locally: Parallel-in-Time
Optimal Control of Neural Networks", on hand-written NumPy kernels.
"""
from .model import PARAM_NAMES, Block, ResNet

__version__ = "0.1.0"

__all__ = ["ResNet", "Block", "PARAM_NAMES", "__version__"]
