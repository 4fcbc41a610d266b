"""Small PyTorch networks converted to .tflite by Google's litert-torch, cached under build/cache.

Used by tests/test_converters.py (``make test-converters``, not part of ``make test``): needs
``torch`` (the CPU wheel) and ``litert-torch``. BatchNorm layers get random statistics so that
no fold is an identity: gamma in [0.5, 1.5] (some negative where a net asks for it), beta and
running mean normal(0, 0.5), running variance in [0.5, 1.5].
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

CACHE = Path(
    os.environ.get("TFL_FUSE_CACHE", Path(__file__).resolve().parent.parent / "build" / "cache")
)


def _nets():
    import torch
    from torch import nn

    class PreactBlock(nn.Module):
        """ResNet-V2 block: x + conv(relu(bn(conv(relu(bn(x))))))."""

        def __init__(self, channels: int) -> None:
            super().__init__()
            self.bn1, self.conv1 = nn.BatchNorm2d(channels), nn.Conv2d(channels, channels, 3, 1, 1)
            self.bn2, self.conv2 = nn.BatchNorm2d(channels), nn.Conv2d(channels, channels, 3, 1, 1)

        def forward(self, x):
            y = self.conv1(torch.relu(self.bn1(x)))
            return x + self.conv2(torch.relu(self.bn2(y)))

    class PreactNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, 1, 1)
            self.blocks = nn.Sequential(PreactBlock(8), PreactBlock(8))
            self.bn = nn.BatchNorm2d(8)
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.head(torch.relu(self.bn(self.blocks(self.stem(x)))))

    return {
        # name: (module, input shape)
        "conv_bn_relu_stack": (
            nn.Sequential(
                nn.Conv2d(3, 8, 3, 1, 1),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.Conv2d(8, 8, 3, 2, 1),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.Conv2d(8, 4, 1),
            ),
            (1, 3, 16, 16),
        ),
        "preact_residual": (PreactNet(), (1, 3, 16, 16)),
        "convtranspose_bn": (
            nn.Sequential(
                nn.Conv2d(3, 8, 3, 1, 1),
                nn.ConvTranspose2d(8, 6, 2, stride=2),
                nn.BatchNorm2d(6),
                nn.ReLU(),
                nn.Conv2d(6, 4, 1),
            ),
            (1, 3, 8, 8),
        ),
        "linear_bn1d": (
            nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)),
            (1, 16),
        ),
        "bn_conv2d": (
            nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 8, 3, 1, 1), nn.ReLU()),
            (1, 4, 12, 12),
        ),
        "bn_conv2d_1x1": (
            nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 8, 1), nn.ReLU()),
            (1, 4, 12, 12),
        ),
        "depthwise_bn": (
            nn.Sequential(
                nn.Conv2d(3, 8, 1),
                nn.ReLU(),
                nn.BatchNorm2d(8),
                nn.Conv2d(8, 8, 3, 1, 1, groups=8),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.Conv2d(8, 4, 1),
            ),
            (1, 3, 12, 12),
        ),
        "grouped_bn": (
            nn.Sequential(
                nn.Conv2d(3, 8, 1),
                nn.ReLU(),
                nn.BatchNorm2d(8),
                nn.Conv2d(8, 8, 1, groups=2),
                nn.ReLU(),
                nn.BatchNorm2d(8),
                nn.Conv2d(8, 8, 3, 1, 1, groups=4),
                nn.BatchNorm2d(8),
                nn.ReLU(),
            ),
            (1, 3, 12, 12),
        ),
        "conv_relu_bn_maxpool": (
            nn.Sequential(
                nn.Conv2d(3, 8, 3, 1, 1),
                nn.ReLU(),
                nn.BatchNorm2d(8),
                nn.MaxPool2d(2),
                nn.Conv2d(8, 4, 1),
            ),
            (1, 3, 16, 16),
        ),
        "bn1d_linear": (nn.Sequential(nn.BatchNorm1d(16), nn.Linear(16, 8)), (1, 16)),
        "conv1d_bn": (
            nn.Sequential(
                nn.Conv1d(4, 8, 3, padding=1),
                nn.BatchNorm1d(8),
                nn.ReLU(),
                nn.Conv1d(8, 8, 3, padding=1),
                nn.BatchNorm1d(8),
                nn.ReLU(),
            ),
            (1, 4, 32),
        ),
    }


NAMES = [
    "conv_bn_relu_stack",
    "preact_residual",
    "convtranspose_bn",
    "linear_bn1d",
    "bn_conv2d",
    "bn_conv2d_1x1",
    "depthwise_bn",
    "grouped_bn",
    "conv_relu_bn_maxpool",
    "bn1d_linear",
    "conv1d_bn",
]


def randomize_batchnorm(module, seed: int = 0) -> None:
    import torch
    from torch import nn

    generator = torch.Generator().manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = layer.num_features
            with torch.no_grad():
                layer.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                layer.bias.copy_(torch.randn(n, generator=generator) * 0.5)
                layer.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                layer.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


def versions() -> str:
    import litert_torch
    import torch

    version = getattr(litert_torch, "__version__", "unknown")
    return f"torch{torch.__version__.split('+')[0]}-litert_torch{version}"


def converted(name: str, seed: int = 0) -> Path:
    """The .tflite of net ``name`` converted by litert-torch, built once and cached."""
    path = CACHE / "torch" / f"{name}-s{seed}-{versions()}.tflite"
    if path.exists():
        return path
    import litert_torch
    import torch

    torch.manual_seed(seed)
    module, shape = _nets()[name]
    randomize_batchnorm(module, seed)
    module.eval()
    edge = litert_torch.convert(module, (torch.randn(*shape),))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    edge.export(temp)
    os.replace(temp, path)
    return path
