"""tfl_fuse: fold BatchNorm and per-channel MUL/ADD into neighbouring layers of TFLite and circle models."""

from .api import VerificationError, optimize, optimize_file
from .model import Model, ModelError

__version__ = "0.1.0"
__all__ = ["Model", "ModelError", "VerificationError", "__version__", "optimize", "optimize_file"]
