"""Shared pytest fixtures: a local S3 endpoint (moto server on loopback) and per-test buckets."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import pytest

_S3_KEY = "testing"
_S3_REGION = "us-east-1"


def _free_loopback_port() -> int:
    """A port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict]:
    """Run moto's S3 server on 127.0.0.1 for the whole session.

    Yields:
        s3fs ``storage_options`` pointing at it:
        ``{"client_kwargs": {"endpoint_url": url}, "key": "testing", "secret": "testing"}``.
    """
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        # Fake credentials and a fixed region so nothing falls back to real AWS config; the IMDS
        # lookup is disabled and loopback excluded from any proxy so no request leaves 127.0.0.1.
        mp.setenv("AWS_ACCESS_KEY_ID", _S3_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", _S3_KEY)
        mp.setenv("AWS_DEFAULT_REGION", _S3_REGION)
        mp.setenv("AWS_REGION", _S3_REGION)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.delenv("AWS_PROFILE", raising=False)
        for var in ("NO_PROXY", "no_proxy"):
            mp.setenv(var, "127.0.0.1,localhost")

        port = _free_loopback_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            yield {
                "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
                "key": _S3_KEY,
                "secret": _S3_KEY,
            }
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server: dict) -> str:
    """Create a fresh, empty bucket on the moto server.

    Returns:
        The bucket name (valid S3 name: lowercase letters and digits), e.g. for ``f"s3://{name}/key"``.
    """
    import boto3

    name = f"test-{uuid.uuid4().hex[:24]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_server["client_kwargs"]["endpoint_url"],
        aws_access_key_id=s3_server["key"],
        aws_secret_access_key=s3_server["secret"],
        region_name=_S3_REGION,
    )
    client.create_bucket(Bucket=name)
    return name


SAMPLE = __import__("pathlib").Path(__file__).resolve().parents[1] / "data" / "caltech8"


@pytest.fixture(scope="session")
def tiny_features(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An extraction (in-process, no Ray) of 24 embedded sample images (3 per class) with a small, fast model setting.

    Returns:
        {"images": the image folder (class folders + labels.csv), "features": its extraction output}.
    """
    import shutil

    from pipeline.config import ExtractConfig
    from pipeline.extract import driver
    from pipeline.extract.runners import LocalRunner

    src = tmp_path_factory.mktemp("tiny_images")
    rows = ["path,label"]
    for cls in sorted(p for p in SAMPLE.iterdir() if p.is_dir()):
        for f in sorted(cls.glob("*.jpg"))[:3]:
            (src / cls.name).mkdir(exist_ok=True)
            shutil.copy(f, src / cls.name / f.name)
            rows.append(f"{cls.name}/{f.name},{cls.name}")
    (src / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path_factory.mktemp("tiny_features")
    driver.run(ExtractConfig(input=str(src), output=str(out), max_side=128, regions=3, shard_size=10, batch_size=8),
               LocalRunner())
    return {"images": str(src), "features": str(out)}


@pytest.fixture(scope="session")
def ray_local() -> Iterator[str]:
    """A local Ray instance for the whole session (2 CPUs, no dashboard), shut down at the end.

    Yields:
        Its GCS address, e.g. for ``RAY_ADDRESS`` of a subprocess that should join it instead of starting its own.
    """
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        if started:
            ray.shutdown()
