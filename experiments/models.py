"""The architectures of the tables: the poster's plain CNN-6 / CNN-9 and a timm ResNet-10-T of adjustable width."""

import math
from collections import OrderedDict

from torch import Tensor, nn

ARCHS: tuple[str, ...] = ("cnn6", "cnn9", "resnet10t")
ARCH_LABELS = {"cnn6": "CNN-6", "cnn9": "CNN-9", "resnet10t": "ResNet-10t (timm)"}


class PlainCNN(nn.Module):
    """The poster's plain CNN-6 / CNN-9 (``algorithm.md`` §6.1), with a width parameter.

    Three stages of ``convs_per_stage`` 3×3 conv + BN + ReLU layers (SAME padding) with ``width``, ``2·width`` and
    ``4·width`` filters, each stage followed by 2×2 max-pooling; then ``fc`` (a VALID conv over the whole remaining
    map to ``4·width`` channels, no BN, no ReLU) and ``score`` (a 1×1 conv to the classes). CNN-6 has 2 convs per
    stage, CNN-9 has 3 (the official code's net with width 64). Conv weights are initialized N(0, 2/fan_in), BN with
    γ = 1, β = 0 and eps 1e-3, as in the official code. BN keeps PyTorch's momentum 0.1 (the official EMA decay 0.999
    needs far more steps than these short runs have).

    Args:
        convs_per_stage: 2 (CNN-6) or 3 (CNN-9).
        num_classes: Number of classes.
        image_size: Input side; must be divisible by 8.
        width: Filters of the first stage.
    """

    def __init__(self, convs_per_stage: int, num_classes: int, image_size: int, width: int = 16) -> None:
        super().__init__()
        if image_size % 8:
            raise ValueError(f"PlainCNN needs an image size divisible by 8; got {image_size}.")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        in_ch, index = 3, 0
        for stage, out_ch in enumerate((width, 2 * width, 4 * width), start=1):
            for _ in range(convs_per_stage):
                index += 1
                layers[f"conv{index}"] = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
                layers[f"bn{index}"] = nn.BatchNorm2d(out_ch, eps=1e-3)
                layers[f"relu{index}"] = nn.ReLU(inplace=True)
                in_ch = out_ch
            layers[f"pool{stage}"] = nn.MaxPool2d(2)
        layers["fc"] = nn.Conv2d(in_ch, in_ch, image_size // 8)
        layers["score"] = nn.Conv2d(in_ch, num_classes, 1)
        layers["flatten"] = nn.Flatten()
        self.net = nn.Sequential(layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.in_channels * m.kernel_size[0] * m.kernel_size[1])))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(B, num_classes)``."""
        return self.net(x)


def build_model(arch: str, num_classes: int, image_size: int, width: int) -> tuple[nn.Module, str]:
    """Build an architecture of the tables; returns the model and its classifier's module name (for ``head``).

    Args:
        arch: ``"cnn6"``, ``"cnn9"`` or ``"resnet10t"`` (timm's ResNet-10-T with stage widths ``width · (1, 2, 4,
            8)`` and stem width ``width / 2``; the timm default is ``width = 64``).
        num_classes: Number of classes.
        image_size: Input side.
        width: Base width.

    Raises:
        ValueError: For an unknown architecture.
    """
    if arch in ("cnn6", "cnn9"):
        return PlainCNN(2 if arch == "cnn6" else 3, num_classes, image_size, width), "net.score"
    if arch == "resnet10t":
        import timm

        channels = (width, 2 * width, 4 * width, 8 * width)
        return timm.create_model(
            "resnet10t", num_classes=num_classes, channels=channels, stem_width=max(4, width // 2)
        ), "fc"
    raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}.")
