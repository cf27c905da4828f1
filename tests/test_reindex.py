"""Versioned publishing (pipeline/store/versions.py) and scheduled re-indexing (pipeline/reindex.py, jobs/reindex.py),
on a temp dir and on S3 (moto on loopback): publish / rollback / prune, a reader during a rebuild, incremental runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
from _jobs import load_job  # noqa: E402

from pipeline.io import storage
from pipeline.store import feature_store as fstore
from pipeline.store import index_store as layout
from pipeline.store import versions as pub

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "caltech8"
TINY = ["--max-side", "64", "--regions", "3", "--shard-size", "4", "--batch-size", "4"]


def _job(name: str) -> Any:
    """Import jobs/<name>.py as a module."""
    return load_job(name)


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict]:
    """A re-index root and its storage options: a temp dir, or a prefix in a fresh moto S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "root"), {}
    so = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/sigregions", so


def _fake_version(root: str, so: dict, name: str, images: int = 5, complete: bool = True) -> str:
    """A version folder with a partial file, and the done-marker when complete (no real index: publishing only
    looks at the marker)."""
    out = pub.version_url(root, name)
    storage.write_bytes(storage.join(out, "fused.faiss"), b"partial", so)
    if complete:
        storage.write_json(storage.join(out, layout.DONE), {"images": images}, so)
    return name


def _names(n: int) -> list[str]:
    return [f"v{i:06d}-20261127T2200{i:02d}Z" for i in range(1, n + 1)]


# ---- pure publishing logic ----------------------------------------------------------------------------------


def test_publish_rollback_prune(root: tuple[str, dict]) -> None:
    url, so = root
    v = _names(6)
    assert pub.current(url, so) is None and pub.list_versions(url, so) == []
    assert pub.resolve_index(url, so) == url  # no pointer: the URL is taken as an index itself
    assert pub.new_version(url, so).startswith("v000001-")

    _fake_version(url, so, v[0], images=5)
    _fake_version(url, so, v[1], images=6, complete=False)  # still building (or crashed)
    with pytest.raises(pub.PublishError, match="not a finished index"):
        pub.publish(url, v[1], so)
    assert pub.current(url, so) is None  # a refused publish writes nothing

    p = pub.publish(url, v[0], so)
    assert p["version"] == v[0] and p["path"] == f"versions/{v[0]}" and p["images"] == 5 and p["previous"] is None
    assert pub.current(url, so) == json.loads(json.dumps(p))
    assert pub.resolve_index(url, so) == storage.join(url, "versions", v[0])
    with pytest.raises(pub.PublishError, match="no complete version older"):
        pub.rollback(url, so)

    _fake_version(url, so, v[1], images=6)  # the build finished
    assert pub.publish(url, v[1], so)["previous"] == v[0]
    assert pub.list_versions(url, so) == [(v[0], True), (v[1], True)]
    assert pub.new_version(url, so).startswith("v000003-")

    back = pub.rollback(url, so)
    assert back["version"] == v[0] and back["rolled_back_from"] == v[1] and back["images"] == 5
    assert pub.resolve_index(url, so) == storage.join(url, "versions", v[0])

    # Prune: v1..v5 complete, v6 being built, v5 current; keep 2 -> v4, v5 (and the build in progress) stay.
    for name in v[2:5]:
        _fake_version(url, so, name)
    _fake_version(url, so, v[5], complete=False)
    pub.publish(url, v[4], so)
    with pytest.raises(ValueError, match="keep must be"):
        pub.prune(url, 1, so)
    assert pub.prune(url, 2, so) == v[:3]
    assert [n for n, _ in pub.list_versions(url, so)] == v[3:]
    # After a rollback the current version is older than the kept ones: it stays too.
    assert pub.rollback(url, so)["version"] == v[3]
    _fake_version(url, so, v[5])
    assert pub.prune(url, 2, so) == []  # kept: v4 (current), v5, v6
    assert [n for n, _ in pub.list_versions(url, so)] == v[3:]
    pub.publish(url, v[5], so)
    assert pub.prune(url, 2, so) == [v[3]]
    if not url.startswith("s3://"):  # the local pointer is replaced by a rename: no temporary file is left behind
        assert sorted(p.name for p in Path(url).iterdir()) == ["CURRENT", "versions"]


def test_pointer_is_small_json_naming_the_version(tmp_path: Path) -> None:
    url = str(tmp_path)
    _fake_version(url, {}, _names(1)[0], images=3)
    pub.publish(url, _names(1)[0], {}, {"features_state": "abc"})
    pointer = json.loads((tmp_path / "CURRENT").read_text())
    assert pointer["path"] == "versions/" + _names(1)[0] and pointer["features_state"] == "abc"
    assert (tmp_path / "CURRENT").stat().st_size < 1024


def test_up_to_date_means_the_newest_complete_build_has_these_features(root: tuple[str, dict]) -> None:
    url, so = root
    v = _names(3)
    assert pub.is_up_to_date(url, "s1", so) is None
    _fake_version(url, so, v[0])
    pub.write_source(url, v[0], {"features_state": "s1"}, so)
    assert pub.is_up_to_date(url, "s1", so) == v[0] and pub.is_up_to_date(url, "s2", so) is None
    _fake_version(url, so, v[1], complete=False)  # a crashed build of newer features does not count
    pub.write_source(url, v[1], {"features_state": "s2"}, so)
    assert pub.is_up_to_date(url, "s2", so) is None and pub.is_up_to_date(url, "s1", so) == v[0]
    _fake_version(url, so, v[2])
    pub.write_source(url, v[2], {"features_state": "s2"}, so)
    assert pub.is_up_to_date(url, "s2", so) == v[2] and pub.is_up_to_date(url, "s1", so) is None


# ---- a reader while a new version is built ------------------------------------------------------------------


@pytest.mark.slow
def test_reader_during_rebuild_sees_the_old_complete_version(tiny_features: Any, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """While version 2 is being written (PCA saved, faiss indexes not yet) and after it is complete but not yet
    published, a search resolves the root to version 1 and loads it whole; once published, version 2."""
    from pipeline.config import IndexConfig
    from pipeline.reduce import build as reduce
    from pipeline.retrieval.search import Searcher

    features = tiny_features["features"] if isinstance(tiny_features, dict) else tiny_features
    n = fstore.read_live_table(features, "images", columns=["status"]).num_rows
    url = str(tmp_path / "root")
    v1, v2 = _names(2)
    reduce.build(IndexConfig(features=features, output=pub.version_url(url, v1), pca_dim=16))
    pub.publish(url, v1)

    seen: list[tuple[str, int]] = []

    def reader() -> None:
        index = pub.resolve_index(url)
        seen.append((index.rsplit("/", 1)[-1], int(Searcher(index, model=object()).meta["images"])))

    real_save = reduce.fx.index_bytes

    def save_index_and_read(*args: Any, **kwargs: Any) -> Any:
        reader()  # mid-build: v2 holds PCA files, no faiss index and no done-marker yet
        with pytest.raises(storage.StorageError, match="no finished index"):
            Searcher(pub.version_url(url, v2), model=object())
        return real_save(*args, **kwargs)

    monkeypatch.setattr(reduce.fx, "index_bytes", save_index_and_read)  # serialising a faiss index to write it
    reduce.build(IndexConfig(features=features, output=pub.version_url(url, v2), pca_dim=8))
    monkeypatch.undo()
    reader()  # built, not yet published
    pub.publish(url, v2)
    reader()
    # Read once per faiss index written (mid-build), once built but unpublished, once published.
    assert len(seen) >= 3 and set(seen[:-1]) == {(v1, n)} and seen[-1] == (v2, n), seen


# ---- jobs/reindex.py end to end (in-process extraction: no Ray) ------------------------------------------------


def _images(dest: Path, per_class: int, classes: int = 3) -> list[Path]:
    """Copy a few sample images (class folders) into ``dest``; returns them."""
    out = []
    for cls in sorted(p for p in SAMPLE.iterdir() if p.is_dir())[:classes]:
        for f in sorted(cls.glob("*.jpg"))[:per_class]:
            (dest / cls.name).mkdir(parents=True, exist_ok=True)
            out.append(Path(shutil.copy(f, dest / cls.name / f.name)))
    return out


def _run(job: Any, argv: list[str], capsys: pytest.CaptureFixture) -> dict:
    capsys.readouterr()
    assert job.main(argv) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.rindex("\n{\n") + 1:] if not out.startswith("{\n") else out)  # the summary, last


def _reindex_twice(input_url: str, url: str, so: dict, add: Callable[[], None],
                   capsys: pytest.CaptureFixture) -> None:
    reindex = _job("reindex")
    search = _job("search")
    common = ["--input", input_url, "--root", url, "--in-process", "--pca-dim", "8", "--keep", "2", *TINY]
    if so:
        common += ["--storage-options", json.dumps(so)]

    first = _run(reindex, common, capsys)
    v1 = first["built"]["version"]
    assert first["extract"]["images"] == 6 and first["built"]["images"] == 6 and first["current"]["version"] == v1
    manifest = storage.read_json(storage.join(pub.features_url(url), "manifest.json"), so)
    assert manifest["run"]["images"] == 6 and manifest["live_images"] == 6

    add()  # one more image
    second = _run(reindex, common, capsys)
    v2 = second["built"]["version"]
    manifest = storage.read_json(storage.join(pub.features_url(url), "manifest.json"), so)
    assert manifest["run"]["images"] == 1 and manifest["run"]["skipped_already_done"] == 6  # only the new image
    assert manifest["live_images"] == 7
    assert second["built"]["images"] == 7 and v2 > v1
    assert pub.current(url, so)["version"] == v2 and pub.current(url, so)["previous"] == v1
    done = storage.read_json(storage.join(pub.version_url(url, v2), layout.DONE), so)
    assert done["images"] == 7
    assert storage.read_json(storage.join(pub.version_url(url, v1), layout.DONE), so)["images"] == 6  # v1 untouched

    # Nothing changed: no new version; the pointer stays.
    third = _run(reindex, common, capsys)
    assert third["built"] is None and third["up_to_date"] == v2 and third["extract"]["images"] == 0
    assert [n for n, _ in pub.list_versions(url, so)] == [v1, v2]

    # jobs/search.py takes the root and follows CURRENT.
    query = SAMPLE / "Faces" / "image_0001.jpg"  # in the index (the first class, the first images)
    argv = ["--index", url, "--image", str(query), "--top-k", "3", "--json"]
    if so:
        argv += ["--storage-options", json.dumps(so)]
    capsys.readouterr()
    assert search.main(argv) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and hits[0]["image_id"] == "Faces/image_0001.jpg"

    # Rollback (the job's flag), and it holds while nothing changes.
    rb = _run(reindex, ["--root", url, "--rollback"] + (["--storage-options", json.dumps(so)] if so else []), capsys)
    assert rb["current"]["version"] == v1 and rb["current"]["rolled_back_from"] == v2
    again = _run(reindex, common, capsys)
    assert again["built"] is None and pub.current(url, so)["version"] == v1


@pytest.mark.slow
def test_reindex_local_incremental(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images = tmp_path / "images"
    _images(images, per_class=2)
    extra = sorted((SAMPLE / "watch").glob("*.jpg"))[0]
    _reindex_twice(str(images), str(tmp_path / "root"), {},
                   lambda: (images / "watch").mkdir() or shutil.copy(extra, images / "watch" / extra.name), capsys)


@pytest.mark.slow
def test_reindex_s3_incremental(s3_server: dict, s3_bucket: str, tmp_path: Path,
                                capsys: pytest.CaptureFixture) -> None:
    import fsspec

    fs = fsspec.filesystem("s3", **s3_server)
    local = tmp_path / "images"
    for p in _images(local, per_class=2):
        fs.put_file(str(p), f"{s3_bucket}/images/{p.relative_to(local).as_posix()}")
    extra = sorted((SAMPLE / "watch").glob("*.jpg"))[0]
    _reindex_twice(f"s3://{s3_bucket}/images", f"s3://{s3_bucket}/sigregions", s3_server,
                   lambda: fs.put_file(str(extra), f"{s3_bucket}/images/watch/{extra.name}"), capsys)


@pytest.mark.slow
def test_a_build_that_crashed_before_its_publish_is_published_by_the_next_run(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    reindex = _job("reindex")
    images, url = tmp_path / "images", str(tmp_path / "root")
    _images(images, per_class=2)
    common = ["--input", str(images), "--root", url, "--in-process", "--pca-dim", "8", "--keep", "2", *TINY]
    v1 = _run(reindex, common, capsys)["built"]["version"]

    extra = sorted((SAMPLE / "watch").glob("*.jpg"))[0]
    (images / "watch").mkdir()
    shutil.copy(extra, images / "watch" / extra.name)

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt("killed between the build and the publish")

    monkeypatch.setattr(pub, "publish", killed)
    with pytest.raises(KeyboardInterrupt):
        reindex.main(common)
    monkeypatch.undo()
    (v2,) = [n for n, complete in pub.list_versions(url) if complete and n != v1]
    assert pub.current(url)["version"] == v1  # built, not published

    rerun = _run(reindex, common, capsys)
    assert rerun["built"] is None and rerun["up_to_date"] == v2 and rerun["current"]["version"] == v2
    assert pub.current(url)["version"] == v2

    # A deliberate rollback is different: it holds.
    assert _run(reindex, ["--root", url, "--rollback"], capsys)["current"]["version"] == v1
    assert _run(reindex, common, capsys)["current"]["version"] == v1


def test_an_empty_input_against_a_live_root_is_refused_and_deletes_nothing(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    reindex = _job("reindex")
    images, empty, url = tmp_path / "images", tmp_path / "empty", str(tmp_path / "root")
    _images(images, per_class=1, classes=2)
    empty.mkdir()
    opts = ["--root", url, "--in-process", "--pca-dim", "2", *TINY]
    v1 = _run(reindex, ["--input", str(images), *opts], capsys)["built"]["version"]

    capsys.readouterr()
    assert reindex.main(["--input", str(empty), *opts]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "lists no images" in err[-1] and "--allow-empty" in err[-1] and not any("Traceback" in e for e in err)
    assert pub.current(url)["version"] == v1 and [n for n, _ in pub.list_versions(url)] == [v1]
    assert len(fstore.live_images(fstore.read_done_markers(pub.features_url(url)))) == 2
