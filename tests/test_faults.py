"""Fault injection: extraction and index build against S3 through a loopback proxy that fails and resets a share of
all requests. Retries must absorb every fault: nothing lost, nothing duplicated, the same outputs as a clean run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _jobs import load_job
from faultproxy import FaultProxy

from pipeline.io import storage
from pipeline.schema import column_to_numpy
from pipeline.store import feature_store as fstore
from pipeline.store import index_store as layout

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "caltech8"
TINY = ["--max-side", "64", "--regions", "3", "--shard-size", "4", "--batch-size", "4"]


def _opts(endpoint: str, s3_server: dict) -> dict:
    """The test server's options on ``endpoint``: no retry settings, so the project's defaults must absorb faults."""
    return {**s3_server, "client_kwargs": {"endpoint_url": endpoint}}


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """12 sample images, 3 classes."""
    src = tmp_path / "images"
    for cls in sorted(p for p in SAMPLE.iterdir() if p.is_dir())[:3]:
        (src / cls.name).mkdir(parents=True)
        for f in sorted(cls.glob("*.jpg"))[:4]:
            shutil.copy(f, src / cls.name / f.name)
    return src


def _rows(features: str, so: dict) -> dict[str, np.ndarray]:
    t = fstore.read_live_table(features, "images", so)
    assert t.column("status").to_pylist() == ["ok"] * t.num_rows
    return dict(zip(t.column("image_id").to_pylist(), column_to_numpy(t, "local")))


@pytest.mark.slow
def test_extract_and_index_survive_a_flaky_s3(images: Path, s3_server: dict, s3_bucket: str) -> None:
    clean = _opts(s3_server["client_kwargs"]["endpoint_url"], s3_server)
    extract, index = load_job("extract"), load_job("index")
    with FaultProxy(clean["client_kwargs"]["endpoint_url"], fail=0.2, reset=0.1, seed=1) as proxy:
        flaky = _opts(proxy.url, s3_server)
        for name, so in (("clean", clean), ("flaky", flaky)):
            out = f"s3://{s3_bucket}/{name}"
            assert extract.main(["--in-process", "--input", str(images), "--output", f"{out}/features", *TINY,
                                 "--storage-options", json.dumps(so)]) == 0
            assert index.main(["--features", f"{out}/features", "--output", f"{out}/index", "--pca-dim", "8",
                               "--storage-options", json.dumps(so)]) == 0
    assert proxy.counts["failed"] >= 5 and proxy.counts["reset"] >= 3, proxy.counts  # the faults really happened
    a, b = _rows(f"s3://{s3_bucket}/clean/features", clean), _rows(f"s3://{s3_bucket}/flaky/features", clean)
    assert sorted(a) == sorted(b) and len(a) == 12
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    ma = storage.read_json(f"s3://{s3_bucket}/clean/index/{layout.DONE}", clean)
    mb = storage.read_json(f"s3://{s3_bucket}/flaky/index/{layout.DONE}", clean)
    assert ma["files"] == mb["files"] and ma["images"] == mb["images"] == 12
