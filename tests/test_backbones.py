"""Backbone registry: feature-map stride and channels, VGG16's conv5_3 + fc6/fc7 head, offline weights handling."""

from __future__ import annotations

import hashlib
import time

import pytest
import torch
from torch import nn

from pipeline.config import BACKBONES
from pipeline.model import weights
from pipeline.model.backbones import REGISTRY, Backbone, WeightsUnavailable, build_backbone
from pipeline.model.transform import normalise

# name -> (stride, channels, descriptor_dim, random weights?): MobileNetV2's ImageNet file is installed offline.
EXPECTED = {
    "mobilenet_v2": (32, 1280, 1280, False),
    "vgg16": (16, 512, 4096, True),
    "resnet50": (32, 2048, 2048, True),
}


_BUILT: dict[str, Backbone] = {}


def backbone(name: str) -> Backbone:
    """Build each backbone once per test session (VGG16's random init alone takes seconds)."""
    if name not in _BUILT:
        _BUILT[name] = build_backbone(name, random_weights=EXPECTED[name][3])
    return _BUILT[name]


def test_every_registered_backbone_is_covered_and_configurable() -> None:
    assert set(REGISTRY) == set(EXPECTED)
    assert set(REGISTRY) <= set(BACKBONES)
    with pytest.raises(KeyError, match="unknown backbone"):
        build_backbone("alexnet", random_weights=True)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_feature_map_stride_and_channels(name: str) -> None:
    stride, channels, dim, _ = EXPECTED[name]
    bb = backbone(name)
    assert (bb.name, bb.stride, bb.channels, bb.descriptor_dim) == (name, stride, channels, dim)
    assert not bb.features.training and (bb.head is None or not bb.head.training)
    img = torch.randint(0, 256, (2, 64, 96, 3), dtype=torch.uint8)
    x = normalise(img, bb)
    assert x.shape == (2, 3, 64, 96) and x.dtype == torch.float32
    with torch.inference_mode():
        f = bb.features(x)
    assert f.shape == (2, channels, 64 // stride, 96 // stride)
    assert bool((f >= 0).all()), "feature maps are post-ReLU: the descriptors assume non-negative activations"
    assert torch.isfinite(f).all()


def test_normalise_uses_the_backbone_mean_and_std() -> None:
    bb = backbone("resnet50")
    img = torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8)  # (1, 1, 1, 3)
    x = normalise(img, bb)[0, :, 0, 0]
    want = [(v / 255 - m) / s for v, m, s in zip((0, 128, 255), bb.mean, bb.std)]
    assert torch.allclose(x, torch.tensor(want), atol=1e-6)


def test_vgg16_is_conv5_3_and_fc6_fc7() -> None:
    bb = backbone("vgg16")
    convs = [m for m in bb.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and convs[-1].out_channels == 512  # conv5_3 is VGG16's 13th conv
    assert isinstance(bb.features[-1], nn.ReLU), "ends at conv5_3 + ReLU, before pool5"
    assert sum(isinstance(m, nn.MaxPool2d) for m in bb.features) == 4  # stride 16
    linears = [m for m in bb.head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512 * 7 * 7, 4096), (4096, 4096)]
    assert bb.head_input == 7
    with torch.inference_mode():
        out = bb.head(torch.rand(3, 512 * 7 * 7))
    assert out.shape == (3, 4096) and bool((out >= 0).all())


def test_head_is_deterministic_in_eval_mode() -> None:
    bb = backbone("vgg16")
    x = torch.rand(2, 512 * 7 * 7)
    with torch.inference_mode():
        assert torch.equal(bb.head(x), bb.head(x)), "dropout must be off in eval mode"


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """TORCH_HOME pointing at an empty folder, and any download attempt failing at once (no network in tests)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls: list[str] = []

    def offline(url, dst, *args, **kwargs):
        calls.append(url)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path, calls


def test_missing_weights_raise_with_the_install_command(empty_torch_home) -> None:
    tmp, calls = empty_torch_home
    assert weights.checkpoint_dir() == tmp / "hub" / "checkpoints"
    assert not weights.is_installed("mobilenet_v2")
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailable) as err:
        build_backbone("mobilenet_v2")
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert weights.INSTALL_COMMAND in msg and "mobilenet_v2" in msg
    assert len(calls) == 1 and calls[0].endswith(weights.OFFLINE["mobilenet_v2"].filename)


def test_missing_weights_without_offline_package_say_where_to_put_the_file(empty_torch_home) -> None:
    tmp, calls = empty_torch_home
    with pytest.raises(WeightsUnavailable) as err:
        build_backbone("resnet50")
    msg = str(err.value)
    assert calls and calls[0] in msg, "names the file to fetch"
    assert str(tmp / "hub" / "checkpoints") in msg, "names the folder to copy it into"


def test_random_weights_never_touch_the_cache(empty_torch_home) -> None:
    _, calls = empty_torch_home
    bb = build_backbone("mobilenet_v2", random_weights=True)
    assert calls == [] and bb.channels == 1280


def test_sha256_of_and_is_installed(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    f = tmp_path / "blob.bin"
    data = bytes(range(256)) * 5000  # > 1 MiB: several streamed blocks
    f.write_bytes(data)
    assert weights.sha256_of(f) == hashlib.sha256(data).hexdigest()
    assert not weights.is_installed("mobilenet_v2")
    dest = weights.weights_path("mobilenet_v2")
    assert dest == tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"not really weights")
    assert weights.is_installed("mobilenet_v2")  # presence only; install() is what checks the hash


def test_check_command_reports_missing_weights(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert weights.main(["check"]) == 1
    assert weights.INSTALL_COMMAND in capsys.readouterr().out
