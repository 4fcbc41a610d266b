"""tfl_fuse: fold BatchNorm and per-channel MUL/ADD into neighbouring layers of TFLite and circle models."""

from .model import Model, ModelError

__version__ = "0.1.0"
__all__ = ["Model", "ModelError", "__version__"]
