"""GPU tests: the region model gives the same outputs on CUDA as on CPU (skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.io.images import decode_image
from pipeline.model.region_model import RegionModel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "caltech8"


def test_cuda_matches_cpu(monkeypatch):
    # TF32 (on by default for cuDNN convolutions on Ampere/Hopper) rounds products to ~1e-3 relative: turn it off so the
    # comparison checks our code, not the number format.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cfg = ModelConfig(max_side=224, regions=4)
    files = sorted(SAMPLE.rglob("*.jpg"))[:6]
    dec = [decode_image(f.read_bytes(), max_side=cfg.max_side) for f in files]
    imgs, sizes = [d.array for d in dec], [(d.width, d.height) for d in dec]
    cpu = RegionModel(cfg, device="cpu")(imgs, sizes)
    gpu_model = RegionModel(cfg, device="cuda")
    assert next(gpu_model.backbone.features.parameters()).is_cuda
    gpu = gpu_model(imgs, sizes)
    for a, b in zip(cpu, gpu):
        for k in ("global", "spoc", "mac", "gem", "crow", "rmac", "local"):
            np.testing.assert_allclose(b[k], a[k], rtol=2e-3, atol=2e-3 * float(np.abs(a[k]).max()))
        # The same regions are chosen (scores may differ in the last bits).
        np.testing.assert_allclose(b["boxes"], a["boxes"], atol=1.0)
