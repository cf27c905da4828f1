"""Listing inputs (pipeline/io/listing.py) and reading them (pipeline/io/storage.py): only regular files are images,
reads are bounded, any legal file name round-trips, manifests with a byte-order mark or without rows."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from pipeline.io import listing, storage
from pipeline.io.storage import NotAFile, StorageError, TooLarge

NAMES = ["a::b.jpg", "c#d.jpg", "e?f.jpg", "g%20h.jpg", "sp ace.jpg", "ünï—códe.jpg", "new\nline.jpg", "x/y::z.jpg"]


def _run_with_timeout(fn, seconds: float = 20.0):
    """Run fn in a thread; fail (instead of hanging the suite) if it does not return in time."""
    out: dict = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below in the test's thread
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} did not return within {seconds}s"
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.mark.parametrize("name", NAMES)
def test_any_legal_file_name_round_trips_locally(tmp_path: Path, name: str) -> None:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(b"bytes of " + name.encode())
    (rec,) = listing.list_images(str(tmp_path))
    assert rec.image_id == name
    assert storage.read_bytes(rec.uri) == b"bytes of " + name.encode()


def test_any_legal_key_round_trips_on_s3(s3_server: dict, s3_bucket: str) -> None:
    names = [n for n in NAMES if "\n" not in n]  # moto's server answers 404 to a PUT of a key with a newline
    for name in names:
        storage.write_bytes(f"s3://{s3_bucket}/in/{name}", b"bytes of " + name.encode(), s3_server)
    recs = listing.list_images(f"s3://{s3_bucket}/in", s3_server)
    assert sorted(r.image_id for r in recs) == sorted(names)
    for r in recs:
        assert storage.read_bytes(r.uri, s3_server) == b"bytes of " + r.image_id.encode()


def test_a_fifo_and_a_link_to_a_device_are_not_listed(tmp_path: Path) -> None:
    (tmp_path / "real.jpg").write_bytes(b"x")
    os.mkfifo(tmp_path / "fifo.jpg")
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    os.symlink(tmp_path / "real.jpg", tmp_path / "link.jpg")  # a link to a regular file is an image
    recs = _run_with_timeout(lambda: listing.list_images(str(tmp_path)))
    assert [r.image_id for r in recs] == ["link.jpg", "real.jpg"]


def test_reading_a_fifo_or_a_device_fails_at_once(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.jpg")
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    for name in ("fifo.jpg", "zero.jpg"):
        with pytest.raises(NotAFile):
            _run_with_timeout(lambda: storage.read_bytes(str(tmp_path / name), max_bytes=1 << 20))


def test_reads_are_bounded(tmp_path: Path, s3_server: dict, s3_bucket: str) -> None:
    (tmp_path / "big.jpg").write_bytes(b"x" * 1001)
    assert storage.read_bytes(str(tmp_path / "big.jpg"), max_bytes=1001) == b"x" * 1001
    with pytest.raises(TooLarge):
        storage.read_bytes(str(tmp_path / "big.jpg"), max_bytes=1000)
    storage.write_bytes(f"s3://{s3_bucket}/big.jpg", b"y" * 1001, s3_server)
    with pytest.raises(TooLarge):
        storage.read_bytes(f"s3://{s3_bucket}/big.jpg", s3_server, max_bytes=1000)
    assert isinstance(TooLarge("x"), StorageError)


def test_csv_manifest_with_a_byte_order_mark(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"a")
    (tmp_path / "m.csv").write_bytes("\ufeffuri,label\na.jpg,cat\n".encode())
    (rec,) = listing.list_images(str(tmp_path / "m.csv"))
    assert (rec.image_id, rec.label) == ("a.jpg", "cat")


def test_manifest_with_a_header_only_says_no_rows(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("uri,label\n")
    with pytest.raises(StorageError, match="has no rows"):
        listing.list_images(str(tmp_path / "m.csv"))


def test_s3_clients_get_bounded_waits_and_patient_retries_unless_told_otherwise() -> None:
    fs, _ = storage.url_to_fs("s3://bucket/x", {"anon": True})
    assert fs.config_kwargs == storage.S3_CLIENT_DEFAULTS
    fs, _ = storage.url_to_fs("s3://bucket/x", {"anon": True, "config_kwargs": {"read_timeout": 5}})
    assert fs.config_kwargs["read_timeout"] == 5 and fs.config_kwargs["connect_timeout"] == 10


def test_a_manifest_row_without_a_uri_is_a_broken_record_not_the_id_none(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jpg").write_bytes(b"a")
    (tmp_path / "m.csv").write_text("uri,label\na.jpg,cat\n,dog\n")
    a, bad = listing.list_images(str(tmp_path / "m.csv"))
    assert (a.image_id, a.error) == ("a.jpg", "")
    assert (bad.image_id, bad.uri, bad.label) == ("m.csv#row-2", "", "dog")
    assert bad.error == f"manifest {tmp_path / 'm.csv'} row 2 has no uri"

    table = pa.table({"uri": ["a.jpg", None, "a.jpg"], "image_id": ["x", "y", None]})
    pq.write_table(table, tmp_path / "m.parquet")
    recs = {r.image_id: r for r in listing.list_images(str(tmp_path / "m.parquet"))}
    assert set(recs) == {"x", "y", "a.jpg"}  # a null id falls back to the uri's, never "None"
    assert recs["y"].error == f"manifest {tmp_path / 'm.parquet'} row 2 has no uri" and not recs["x"].error
    assert recs["a.jpg"].fingerprint == "a.jpg" and recs["a.jpg"].uri.endswith("/a.jpg")
