"""Tests for pipeline.bench.datasets and safe_pickle: labelled sets, query lists, Oxford gt files, safe gnd pickles."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.bench.datasets import (
    IMAGE_EXTS,
    LabelledSet,
    load_labelled_set,
    load_revisited_gnd,
    read_oxford_gt,
    read_query_list,
    sample_queries,
)
from pipeline.bench.safe_pickle import SafeUnpickler, safe_loads

# CI clones the repository next to shared/, so the datasets sit two levels above this file's folder.
DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
CALTECH = DATASETS / "caltech101"
PARIS_SUBSET = DATASETS / "paris6k-subset5"
OXFORD_GT = DATASETS / "oxford5k-groundtruth" / "gt_files_170407"


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


# --------------------------------------------------------------------------------------------------------------------
# Labelled sets
# --------------------------------------------------------------------------------------------------------------------


def test_class_folders(tmp_path):
    for rel in ("a/x.jpg", "a/y.PNG", "b/sub/z.jpeg", "b/w.webp", "c/img.tiff"):
        _touch(tmp_path / rel)
    for rel in ("b/notes.txt", "top.jpg", ".hidden/q.jpg", "a/._x.jpg", "a/.DS_Store"):
        _touch(tmp_path / rel)  # not an image / no class folder / hidden: all skipped
    ds = load_labelled_set(str(tmp_path))
    assert ds.paths == ["a/x.jpg", "a/y.PNG", "b/sub/z.jpeg", "b/w.webp", "c/img.tiff"]
    assert ds.labels == ["a", "a", "sub", "b", "c"]  # the label is the parent folder's name
    assert ds.label_names() == ["a", "b", "c", "sub"]
    np.testing.assert_array_equal(ds.label_array(), [0, 0, 3, 1, 2])
    assert ds.label_array().dtype == np.int64
    assert ds.index_of("b/w.webp") == 3
    assert ds.index_of("./b\\w.webp") == 3
    with pytest.raises(KeyError):
        ds.index_of("a/missing.jpg")
    assert len(ds) == 5
    assert ".gif" in IMAGE_EXTS and ".tif" in IMAGE_EXTS


def test_caltech_layout_merge_and_exclude(tmp_path):
    root = tmp_path / "caltech101"
    cats = root / "101_ObjectCategories"
    for cls, n in (("Faces", 3), ("Faces_easy", 3), ("BACKGROUND_Google", 2), ("ant", 2)):
        for i in range(1, n + 1):
            _touch(cats / cls / f"image_{i:04d}.jpg")
    ds = load_labelled_set(str(root))
    assert ds.paths[0] == "101_ObjectCategories/BACKGROUND_Google/image_0001.jpg"  # relative to root
    assert sorted(set(ds.labels)) == ["BACKGROUND_Google", "Faces", "Faces_easy", "ant"]

    merged = load_labelled_set(str(root), merge={"Faces_easy": "Faces"}, exclude_labels=["BACKGROUND_Google"])
    assert len(merged) == 8
    assert merged.labels.count("Faces") == 6 and "Faces_easy" not in merged.labels
    assert merged.labels[merged.index_of("101_ObjectCategories/Faces_easy/image_0002.jpg")] == "Faces"
    # Excluding by the pre-merge name drops only that folder.
    only_faces = load_labelled_set(str(root), merge={"Faces_easy": "Faces"}, exclude_labels=["Faces_easy", "ant"])
    assert sorted(set(only_faces.labels)) == ["BACKGROUND_Google", "Faces"] and len(only_faces) == 5


def test_labels_csv_with_extra_columns(tmp_path):
    # The label column is found by name even when it is not the second column; extra columns are ignored.
    (tmp_path / "labels.csv").write_text(
        "path,width,class,height\n"
        "imgs/b/2.jpg,10,bird,20\n"
        "./imgs/a/1.jpg,10,cat,20\n"
        "\n"
        "imgs\\a\\3.jpg,5,cat,5\n"
    )
    ds = load_labelled_set(str(tmp_path))
    assert ds.paths == ["imgs/a/1.jpg", "imgs/a/3.jpg", "imgs/b/2.jpg"]  # sorted, posix
    assert ds.labels == ["cat", "cat", "bird"]
    # Images are not required on disk, and labels.csv beats the (absent) class folders.
    assert not (tmp_path / "imgs").exists()


def test_labels_csv_column_choice_and_errors(tmp_path):
    (tmp_path / "gt.csv").write_text("file,category,score\nx.jpg,one,0.5\ny.jpg,two,0.1\n")
    ds = load_labelled_set(str(tmp_path), labels_csv="gt.csv")  # no known name: second column
    assert ds.labels == ["one", "two"]
    (tmp_path / "lm.csv").write_text("path,id,Landmark\nx.jpg,7,eiffel\n")
    assert load_labelled_set(str(tmp_path), labels_csv=str(tmp_path / "lm.csv")).labels == ["eiffel"]
    (tmp_path / "dup.csv").write_text("path,label\nx.jpg,a\n./x.jpg,b\n")
    with pytest.raises(ValueError, match="twice"):
        load_labelled_set(str(tmp_path), labels_csv="dup.csv")
    (tmp_path / "bad.csv").write_text("path,label\nx.jpg\n")
    with pytest.raises(ValueError):
        load_labelled_set(str(tmp_path), labels_csv="bad.csv")
    with pytest.raises(FileNotFoundError):
        load_labelled_set(str(tmp_path), labels_csv="nope.csv")
    with pytest.raises(FileNotFoundError):
        load_labelled_set(str(tmp_path / "absent"))


def test_labelled_set_checks_lengths():
    with pytest.raises(ValueError):
        LabelledSet(root=".", paths=["a.jpg"], labels=[])


def test_read_query_list(tmp_path):
    p = tmp_path / "q.txt"
    p.write_text("# fixed queries\n\na/1.jpg\n  ./b/2.jpg  \n# trailing comment\nc/3.jpg")
    assert read_query_list(str(p)) == ["a/1.jpg", "b/2.jpg", "c/3.jpg"]


def test_sample_queries_stratified_and_deterministic():
    paths, labels = [], []
    for label, n in (("a", 40), ("b", 3), ("c", 100), ("BACKGROUND_Google", 50)):
        for i in range(n):
            paths.append(f"{label}/{i:03d}.jpg")
            labels.append(label)
    order = np.argsort(paths)
    ds = LabelledSet(root="r", paths=[paths[i] for i in order], labels=[labels[i] for i in order])
    q = sample_queries(ds, fraction=0.05, seed=0)
    per_label = {lab: sum(p.startswith(lab + "/") for p in q) for lab in ("a", "b", "c", "BACKGROUND_Google")}
    assert per_label == {"a": 2, "b": 1, "c": 5, "BACKGROUND_Google": 0}  # at least 1 per label, clutter excluded
    assert q == sample_queries(ds, fraction=0.05, seed=0)
    assert q != sample_queries(ds, fraction=0.05, seed=1)
    assert len(set(q)) == len(q) and all(p in set(ds.paths) for p in q)
    assert len(sample_queries(ds, fraction=1.0, exclude_labels=())) == len(ds)
    with pytest.raises(ValueError):
        sample_queries(ds, fraction=0.0)


@pytest.mark.skipif(not CALTECH.is_dir(), reason=f"Caltech-101 not found at {CALTECH}")
def test_real_caltech101():
    ds = load_labelled_set(str(CALTECH))
    assert len(ds) == 9144 and len(set(ds.labels)) == 102
    assert ds.labels[ds.index_of("101_ObjectCategories/Faces_easy/image_0001.jpg")] == "Faces_easy"
    queries = read_query_list(str(CALTECH / "queries_5pct_seed0.txt"))
    assert len(queries) == 432 and len(set(queries)) == 432
    for p in queries:
        ds.index_of(p)  # raises KeyError if a query is not in the set
    assert not any(ds.labels[ds.index_of(p)] == "BACKGROUND_Google" for p in queries)
    # The shipped list is exactly what sample_queries draws: the procedure is the documented one.
    assert sample_queries(ds, fraction=0.05, seed=0) == queries
    merged = load_labelled_set(str(CALTECH), merge={"Faces_easy": "Faces"})
    assert len(merged) == 9144 and len(set(merged.labels)) == 101
    assert merged.labels.count("Faces") == ds.labels.count("Faces") + ds.labels.count("Faces_easy")


@pytest.mark.skipif(not PARIS_SUBSET.is_dir(), reason=f"Paris subset not found at {PARIS_SUBSET}")
def test_real_paris_subset_landmark_column():
    ds = load_labelled_set(str(PARIS_SUBSET))
    assert len(ds) == 250
    assert {lab: ds.labels.count(lab) for lab in set(ds.labels)} == {
        "defense": 50, "eiffel_tower": 50, "invalides": 50, "louvre": 50, "moulinrouge": 50,
    }


# --------------------------------------------------------------------------------------------------------------------
# Oxford / Paris official ground truth
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not OXFORD_GT.is_dir(), reason=f"Oxford 5k ground truth not found at {OXFORD_GT}")
def test_real_oxford_gt():
    qs = read_oxford_gt(str(OXFORD_GT))
    assert len(qs) == 55
    assert [q.name for q in qs] == sorted(q.name for q in qs)
    assert len({q.name.rsplit("_", 1)[0] for q in qs}) == 11  # 11 landmarks x 5 queries
    by_name = {q.name: q for q in qs}
    q = by_name["all_souls_1"]
    # all_souls_1_query.txt: "oxc1_all_souls_000013 136.5 34.1 648.5 955.7"
    assert q.image_id == "all_souls_000013"
    assert q.bbox == (136.5, 34.1, 648.5, 955.7)
    # all_souls_1_good.txt has 25 lines, one of them (all_souls_000091) twice: 24 distinct ids.
    assert (len(q.good), len(q.ok), len(q.junk)) == (24, 54, 33)
    assert "all_souls_000091" in q.good and "oxford_003521" in q.ok and "all_souls_000220" in q.junk
    assert len(q.positives) == 78
    h = by_name["hertford_3"]
    assert h.image_id == "oxford_000317" and h.bbox == (85.0, 3.0, 962.0, 622.0)
    assert (len(h.good), len(h.ok), len(h.junk)) == (35, 19, 7)
    r = by_name["radcliffe_camera_5"]
    assert r.image_id == "bodleian_000132" and (len(r.good), len(r.ok), len(r.junk)) == (105, 116, 127)
    for q in qs:
        assert not q.image_id.startswith("oxc1_")
        assert q.image_id in q.positives  # every official query image is itself a good/ok image
        assert not (q.good & q.ok) and not (q.good & q.junk) and not (q.ok & q.junk)
        x1, y1, x2, y2 = q.bbox
        assert x1 < x2 and y1 < y2


def test_oxford_gt_paris_style_and_missing_file(tmp_path):
    (tmp_path / "defense_1_query.txt").write_text("paris_defense_000605 16.0 48.0 1023.0 703.0\n")
    (tmp_path / "defense_1_good.txt").write_text("paris_defense_000605\nparis_defense_000001\n\n")
    (tmp_path / "defense_1_ok.txt").write_text("")
    (tmp_path / "defense_1_junk.txt").write_text("paris_general_000123\n")
    (qa,) = read_oxford_gt(str(tmp_path))
    assert qa.name == "defense_1" and qa.image_id == "paris_defense_000605"  # no oxc1_ prefix: kept as written
    assert qa.good == frozenset({"paris_defense_000605", "paris_defense_000001"}) and qa.ok == frozenset()
    (tmp_path / "eiffel_1_query.txt").write_text("paris_eiffel_000001 1 2 3 4\n")
    with pytest.raises(FileNotFoundError, match="eiffel_1_good"):
        read_oxford_gt(str(tmp_path))
    (tmp_path / "eiffel_1_query.txt").write_text("paris_eiffel_000001 1 2 3\n")
    with pytest.raises(ValueError):
        read_oxford_gt(str(tmp_path))


# --------------------------------------------------------------------------------------------------------------------
# Revisited ground-truth pickles, read without running code
# --------------------------------------------------------------------------------------------------------------------


def _gnd_like() -> dict:
    return {
        "imlist": [f"img_{i}" for i in range(10)],
        "qimlist": ["img_3", "img_7"],
        "gnd": [
            {"bbx": [1.5, 2.0, 30.0, 40.0], "easy": np.array([0, 1]), "hard": np.array([2]), "junk": np.array([9])},
            {
                "bbx": np.array([0.0, 0.0, 5.0, 5.0]),
                "easy": np.array([], dtype=np.int64),
                "hard": np.array([4, 5], dtype=np.int32),
                "junk": np.array([], dtype=np.int64),
            },
        ],
    }


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_gnd_round_trip(protocol):
    src = _gnd_like()
    src["extra"] = {"set": {1, 2}, "fs": frozenset({3}), "c": 1 + 2j, "s": np.float32(2.5), "b": b"\x00\xff",
                    "ba": bytearray(b"xy"), "t": (1, "a"), "rec": np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")])}
    got = load_revisited_gnd(pickle.dumps(src, protocol=protocol))
    assert got["imlist"] == src["imlist"] and got["qimlist"] == src["qimlist"]
    assert len(got["gnd"]) == 2
    np.testing.assert_array_equal(got["gnd"][0]["easy"], [0, 1])
    np.testing.assert_array_equal(got["gnd"][1]["hard"], [4, 5])
    np.testing.assert_allclose(got["gnd"][0]["bbx"], [1.5, 2.0, 30.0, 40.0])
    for g in got["gnd"]:
        for k in ("easy", "hard", "junk"):
            assert g[k].dtype == np.int64 and g[k].ndim == 1
    extra = got["extra"]
    assert extra["set"] == {1, 2} and extra["fs"] == frozenset({3}) and extra["c"] == 1 + 2j
    assert extra["s"] == np.float32(2.5) and extra["b"] == b"\x00\xff" and extra["ba"] == bytearray(b"xy")
    np.testing.assert_array_equal(extra["rec"], src["extra"]["rec"])


def test_gnd_from_path_and_fsspec_urls(tmp_path):
    import fsspec

    data = pickle.dumps(_gnd_like())
    p = tmp_path / "gnd_test.pkl"
    p.write_bytes(data)
    assert load_revisited_gnd(str(p))["qimlist"] == ["img_3", "img_7"]
    assert load_revisited_gnd(p)["qimlist"] == ["img_3", "img_7"]
    assert load_revisited_gnd(p.as_uri())["qimlist"] == ["img_3", "img_7"]  # file://
    with fsspec.open("memory://datasets-test/gnd.pkl", "wb") as f:
        f.write(data)
    try:
        assert len(load_revisited_gnd("memory://datasets-test/gnd.pkl")["gnd"]) == 2
    finally:
        fsspec.filesystem("memory").rm("/datasets-test", recursive=True)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.pop("gnd"), "missing keys"),
        (lambda d: d["gnd"].pop(), "2 queries"),
        (lambda d: d["gnd"][0].pop("junk"), "missing keys"),
        (lambda d: d["gnd"][0].update(easy=np.array([10])), "out of range"),
        (lambda d: d["gnd"][0].update(bbx=[1, 2, 3]), "4 numbers"),
        (lambda d: d["gnd"][0].update(hard=np.array([0.5])), "integer"),
    ],
)
def test_gnd_validation(mutate, match):
    d = _gnd_like()
    mutate(d)
    with pytest.raises(ValueError, match=match):
        load_revisited_gnd(pickle.dumps(d))
    with pytest.raises(ValueError, match="dict"):
        load_revisited_gnd(pickle.dumps([1, 2]))


# Malicious pickles: each would create its marker file if unpickled with plain pickle (checked first, so the
# refusal test cannot pass vacuously).


def _write_marker(path: str) -> None:
    with open(path, "w") as f:
        f.write("ran")


class _Payload:
    """Unpickles to a call of ``fn(*args)``."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class _Plain:
    """An ordinary class: not code-running by itself, but arbitrary classes are not ground truth."""

    def __init__(self):
        self.x = 1


def _global_call(module: str, name: str, arg: str) -> bytes:
    """Protocol-0 pickle of ``module.name(arg)``, for spellings __reduce__ cannot produce (``os.system``)."""
    return f"c{module}\n{name}\n(V{arg}\ntR.".encode()


def _malicious(kind: str, marker: Path) -> bytes:
    m = str(marker)
    if kind == "os.system":
        return _global_call("os", "system", f"touch {m}")  # pickling os.system itself writes posix.system
    if kind == "posix.system":
        return pickle.dumps(_Payload(os.system, f"touch {m}"))
    if kind == "subprocess.Popen":
        return pickle.dumps(_Payload(subprocess.Popen, ["touch", m]))
    if kind == "builtins.eval":
        return pickle.dumps(_Payload(eval, f"open({m!r}, 'w').close()"))
    if kind == "builtins.exec":
        return pickle.dumps(_Payload(exec, f"open({m!r}, 'w').close()"), protocol=2)  # as __builtin__.exec
    if kind == "custom function":
        return pickle.dumps(_Payload(_write_marker, m))
    if kind == "nested in gnd":
        d = _gnd_like()
        d["gnd"][1]["junk"] = _Payload(exec, f"open({m!r}, 'w').close()")
        return pickle.dumps(d)
    raise AssertionError(kind)


MALICIOUS = {
    "os.system": "os.system",
    "posix.system": "posix.system",
    "subprocess.Popen": "subprocess.Popen",
    "builtins.eval": "builtins.eval",
    "builtins.exec": "__builtin__.exec",
    "custom function": "_write_marker",
    "nested in gnd": "builtins.exec",
}


@pytest.mark.skipif(os.name != "posix", reason="payloads use posix shell commands")
@pytest.mark.parametrize("kind", list(MALICIOUS))
def test_malicious_pickles_refused(kind, tmp_path):
    live = tmp_path / "live_marker"
    obj = pickle.loads(_malicious(kind, live))  # plain pickle runs the payload ...
    if isinstance(obj, subprocess.Popen):
        obj.wait()
    assert live.exists(), "the payload must be real for the refusal below to mean anything"

    marker = tmp_path / "marker"
    with pytest.raises(pickle.UnpicklingError, match="refused global") as exc:
        load_revisited_gnd(_malicious(kind, marker))  # ... the safe loader refuses it
    assert MALICIOUS[kind] in str(exc.value)
    assert not marker.exists()


def test_custom_class_and_other_globals_refused(tmp_path):
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        with pytest.raises(pickle.UnpicklingError, match="refused global"):
            load_revisited_gnd(pickle.dumps(_Plain(), protocol=protocol))
    for module, name in (("numpy", "load"), ("copyreg", "_reconstructor"), ("builtins", "getattr"),
                         ("builtins", "__import__"), ("numpy", "core.multiarray._reconstruct")):
        with pytest.raises(pickle.UnpicklingError, match=f"refused global {module}.{name}"):
            SafeUnpickler(io.BytesIO(b"")).find_class(module, name)
    # _codecs.encode is admitted only for latin-1, the one encoding protocols 0-2 use for bytes.
    with pytest.raises(pickle.UnpicklingError, match="zlib"):
        load_revisited_gnd(_global_call("_codecs", "encode", "abc")[:-3] + b"Vzlib\ntR.")


BIG = 1 << 33  # 8 GiB
ALLOCATING = {
    "bytearray(8 GiB)": b"cbuiltins\nbytearray\n(I%d\ntR." % BIG,
    "bytes(8 GiB)": b"c__builtin__\nbytes\n(I%d\ntR." % BIG,
    "ndarray((8 Gi,))": b"cnumpy\nndarray\n((I%d\nttR." % BIG,
    "_reconstruct(ndarray, (8 Gi,))": b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(I%d\ntS'b'\ntR." % BIG,
}


@pytest.mark.parametrize("kind", list(ALLOCATING))
def test_a_tiny_pickle_cannot_allocate_gigabytes(kind: str) -> None:
    data = ALLOCATING[kind]
    assert len(data) < 100
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        safe_loads(data)


def test_arrays_of_every_protocol_still_load_within_the_bound() -> None:
    a = {"x": np.arange(1000, dtype=np.int64).reshape(10, 100), "b": b"\x00" * 10, "ba": bytearray(b"ab")}
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        out = safe_loads(pickle.dumps(a, protocol=protocol))
        np.testing.assert_array_equal(out["x"], a["x"])
        assert out["b"] == a["b"] and out["ba"] == a["ba"]
