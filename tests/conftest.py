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
