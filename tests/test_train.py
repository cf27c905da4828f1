"""Training the region model (pipeline/densecap/, jobs/train_regions.py) on a tiny generated Visual Genome-style set:
losses fall, the trained RPN recalls the drawn shapes better than the untrained one, the checkpoint loads into
extraction (RegionModel, an in-process extraction with --proposer rpn), and one run goes through Ray Train's TorchTrainer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torchvision.ops import box_iou

from pipeline.cli import parse_args
from pipeline.config import ConfigError, ExtractConfig, ModelConfig, from_dict
from pipeline.densecap.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, region_checkpoint, save_checkpoint
from pipeline.densecap.config import METRICS_FILE, TrainConfig, replace
from pipeline.densecap.data import (
    ANNOTATIONS,
    RegionDataset,
    collate,
    load_region_data,
    parse_region_descriptions,
    to_device,
)
from pipeline.densecap.loop import _first_good, build_optimizer, read_state_marker
from pipeline.densecap.model import DenseCapModel
from pipeline.densecap.ray_train import fit, fit_local, prepare_data, summary
from pipeline.densecap.vocab import END, PAD, SPECIAL_TOKENS, UNK, build_vocab, decode, encode, tokenize
from pipeline.io.images import decode_image
from pipeline.model.proposals import proposal_recall
from pipeline.model.region_model import RegionModel

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 8
STEPS = 12
SIZE = 96
SHAPES = {"square": "a red square", "circle": "a blue circle", "triangle": "a green triangle"}
COLOURS = {"square": (220, 30, 30), "circle": (30, 60, 220), "triangle": (30, 170, 40)}

# Small and fast: real MobileNetV2 features (installed offline), 128 px images (a 4 x 4 feature map), small heads.
TINY = dict(backbone="mobilenet_v2", max_side=128, anchor_sizes="32,64,96", aspect_ratios="0.5,1,2",
            projection_dim=64, embed_dim=32, lstm_dim=64, batch_size=2, lr=2e-3, min_word_count=1, val_fraction=0.25,
            eval_top_k=10, caption_regions=16, rpn_batch=64, rpn_channels=32, box_weight=5.0, loader_workers=0, seed=0, log_every=1000)


def make_dataset(root: Path, n: int = 24, seed: int = 0) -> dict[int, list[tuple[float, float, float, float]]]:
    """Write n images (SIZE x SIZE, textured background, 1-2 non-overlapping drawn shapes) under root/images/ and
    their regions (one per shape: "A red square.", "A blue circle.", "A green triangle.") to
    root/region_descriptions.json in Visual Genome's format.

    Returns:
        {image_id: shape boxes [x1, y1, x2, y2]}.
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries, shapes = [], {}
    for k in range(n):
        image_id = 1000 + k
        bg = rng.integers(120, 200, 3)
        arr = np.clip(bg + rng.normal(0, 12, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        im = Image.fromarray(arr)
        draw = ImageDraw.Draw(im)
        count = 1 + int(rng.random() < 0.5)
        regions, boxes = [], []
        halves = [(0, SIZE // 2), (SIZE // 2, SIZE)] if count == 2 else [(0, SIZE)]
        vertical = rng.random() < 0.5
        for rid, (lo, hi) in enumerate(halves):
            kind = str(rng.choice(list(SHAPES)))
            s = int(rng.integers(28, 44)) if count == 2 else int(rng.integers(30, 56))
            s = min(s, hi - lo - 2)
            a = int(rng.integers(lo + 1, hi - s))  # along the split axis, inside its half
            b = int(rng.integers(1, SIZE - s))
            x, y = (b, a) if vertical else (a, b)
            box = (x, y, x + s, y + s)
            if kind == "square":
                draw.rectangle([x, y, x + s - 1, y + s - 1], fill=COLOURS[kind])
            elif kind == "circle":
                draw.ellipse([x, y, x + s - 1, y + s - 1], fill=COLOURS[kind])
            else:
                draw.polygon([(x, y + s - 1), (x + s - 1, y + s - 1), (x + (s - 1) / 2, y)], fill=COLOURS[kind])
            boxes.append(tuple(float(v) for v in box))
            regions.append({"region_id": image_id * 10 + rid, "image_id": image_id, "x": x, "y": y, "width": s,
                            "height": s, "phrase": SHAPES[kind].capitalize() + "."})
        im.save(root / "images" / f"{image_id}.jpg", quality=92)
        entries.append({"id": image_id, "regions": regions})
        shapes[image_id] = boxes
    (root / ANNOTATIONS).write_text(json.dumps(entries))
    return shapes


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread (RegionModel(threads=N) sets it process-wide): on a small shared machine, more threads mostly
    wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("vg_shapes")
    return {"root": root, "shapes": make_dataset(root)}


def tiny_config(data: Path, output: Path, **changes) -> TrainConfig:
    return from_dict(TrainConfig, {**TINY, "data": str(data), "output": str(output), **changes})


@pytest.fixture(scope="module")
def trained(shapes_data: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One short in-process training run (no Ray) shared by the checks below."""
    out = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(shapes_data["root"], out, epochs=EPOCHS)
    result = fit_local(cfg, device="cpu")
    return {"cfg": cfg, "result": result, "checkpoint": result["checkpoint"], "out": out}


# ------------------------------------------------------------------------------------------------------ unit tests


def test_tokenize_vocab_and_encoding_round_trip() -> None:
    assert tokenize("A man's Red-hat, on.") == ["a", "mans", "redhat", "on"]
    vocab = build_vocab([["a", "red", "square"], ["a", "blue", "circle"], ["a", "red", "dot"]], min_count=2)
    assert vocab == ["<pad>", "<start>", "<end>", "<unk>", "a", "red"]
    index = {w: i for i, w in enumerate(vocab)}
    ids = encode(["a", "red", "circle"], index, 5)
    assert ids.tolist() == [4, 5, UNK, PAD, PAD]
    assert decode([*ids[:3], END, 4], vocab) == "a red <unk>"


def test_parse_region_descriptions_drops_what_densecap_drops() -> None:
    obj = [{"id": 7, "regions": [
        {"region_id": 1, "image_id": 7, "x": 5, "y": 6, "width": 10, "height": 20, "phrase": "a cat"},
        {"region_id": 2, "image_id": 7, "x": 5, "y": 6, "width": 0, "height": 20, "phrase": "no box"},
        {"region_id": 3, "image_id": 7, "x": 5, "y": 6, "width": 3, "height": 3, "phrase": "  ..  "},
        {"region_id": 4, "image_id": 7, "x": 5, "y": 6, "width": 3, "height": 3, "phrase": "one two three four"}]},
        {"id": 8, "regions": []}]
    ids, per_image, dropped = parse_region_descriptions(obj, max_words=3)
    assert ids == [7] and per_image == [[([5.0, 6.0, 15.0, 26.0], ["a", "cat"])]]
    assert dropped == {"empty_box": 1, "empty_phrase": 1, "long_phrase": 1, "images_without_regions": 1,
                       "duplicate_images": 0}
    with pytest.raises(ValueError):
        parse_region_descriptions({"id": 1}, 15)


def test_train_config_is_strict(tmp_path: Path) -> None:
    cfg = parse_args(TrainConfig, ["--data", "d", "--output", "o", "--workers", "2", "--use-gpu",
                                     "--no-freeze-backbone", "--epochs", "3", "--lr", "1e-4"], "t", "t")
    assert (cfg.workers, cfg.use_gpu, cfg.freeze_backbone, cfg.epochs, cfg.lr) == (2, True, False, 3, 1e-4)
    assert cfg.anchors() == {"anchor_sizes": [48.0, 96.0, 192.0, 384.0], "aspect_ratios": [0.5, 1.0, 2.0]}
    for bad in ({"epochs": 0}, {"anchor_sizes": "48,x"}, {"anchor_sizes": "-1"}, {"val_fraction": 1.0},
                {"pos_iou": 0.2}, {"backbone": "alexnet"}, {"epochs": "2.5"}, {"bogus": 1}, {"lr": "nan"}):
        with pytest.raises(ConfigError):
            from_dict(TrainConfig, {"data": "d", "output": "o", **bad})
    with pytest.raises(SystemExit):
        parse_args(TrainConfig, ["--output", "o"], "t", "t")  # --data is required


def test_load_region_data_splits_by_seed_and_builds_vocab_from_training_phrases(shapes_data: dict,
                                                                                  tmp_path: Path) -> None:
    cfg = tiny_config(shapes_data["root"], tmp_path)
    train, val, vocab, stats = load_region_data(cfg)
    assert (len(train), len(val)) == (18, 6) and stats["missing_files"] == 0
    assert not set(train.image_ids) & set(val.image_ids)
    again = load_region_data(cfg)
    assert again[0].image_ids.tolist() == train.image_ids.tolist() and again[2] == vocab
    other = load_region_data(replace(cfg, seed=1))
    assert other[1].image_ids.tolist() != val.image_ids.tolist()
    assert vocab[:4] == list(SPECIAL_TOKENS) and {"a", "red", "square", "blue", "circle"} <= set(vocab)
    boxes, tokens = train.regions(0)
    assert boxes.shape == (len(tokens), 4) and decode(tokens[-1], vocab) in set(SHAPES.values())
    # A dataset item is decoded like extraction, its boxes scaled to the resized image.
    item = RegionDataset(train, 128)[0]
    assert item["image"].shape == (128, 128, 3)
    np.testing.assert_allclose(item["boxes"], boxes * 128 / SIZE, rtol=1e-5)


def test_missing_and_corrupt_images_are_skipped(shapes_data: dict, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "vg"
    shutil.copytree(shapes_data["root"], root)
    (root / "images" / "1001.jpg").unlink()  # annotated, no file: left out when the data is loaded
    cfg = tiny_config(root, tmp_path / "out")
    train, val, _, stats = load_region_data(cfg)
    assert stats["missing_files"] == 1 and len(train) + len(val) == 23 and 1001 not in set(train.image_ids)
    bad = int(train.image_ids[0])
    (root / "images" / f"{bad}.jpg").write_bytes(b"not a jpeg")  # found, but does not decode: skipped per step
    ds = RegionDataset(train, cfg.max_side)
    assert ds[0] is None and len(collate([ds[0], ds[1]])) == 1
    assert _first_good(ds, [0, 1])[0]["image_id"] == int(train.image_ids[1])


def test_a_few_steps_lower_the_loss(shapes_data: dict, tmp_path: Path) -> None:
    cfg = tiny_config(shapes_data["root"], tmp_path)
    train, _, vocab, _ = load_region_data(cfg)
    torch.manual_seed(0)
    model = DenseCapModel(cfg, len(vocab)).train()
    assert not any(p.requires_grad for p in model.features.parameters())  # frozen backbone by default
    batch = collate([RegionDataset(train, cfg.max_side)[i] for i in range(6)])
    inputs = to_device(batch, model.bb, torch.device("cpu"))
    opt = build_optimizer(model, cfg)
    history = []
    for _ in range(STEPS):
        torch.manual_seed(1)  # the same anchor sample each step: the loss of one fixed problem
        out = model(*inputs)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append({k: float(out[k].detach()) for k in ("loss", "objectness", "box", "caption")})
    first, last = history[0], history[-1]
    print("\nfixed-batch losses, first -> last step:", {k: (round(first[k], 3), round(last[k], 3)) for k in first})
    # The box loss starts at its floor for anchors that already fit (zero deltas) and needs more than a few steps:
    # it is checked over a whole training run below.
    for k in ("loss", "objectness", "caption"):
        assert last[k] < first[k], (k, [h[k] for h in history])
    assert last["loss"] < 0.8 * first["loss"] and np.isfinite(last["box"])


def _tiny_vgg(random_weights: bool):
    """A stand-in for VGG16 (stride 16, a fc6/fc7-like head giving 4096-D region codes) that builds in milliseconds."""
    from torch import nn

    from pipeline.model.backbones import Backbone

    torch.manual_seed(123)
    feats = nn.Sequential(nn.Conv2d(3, 8, 3, stride=16, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    head = nn.Sequential(nn.Linear(8 * 7 * 7, 4096), nn.ReLU(), nn.Dropout())
    return Backbone("vgg16", feats, stride=16, channels=8, head=head, head_input=7)


def test_vgg_style_head_and_a_fine_tuned_backbone_travel_in_the_checkpoint(shapes_data: dict, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.model import backbones

    monkeypatch.setitem(backbones.REGISTRY, "vgg16", _tiny_vgg)
    cfg = tiny_config(shapes_data["root"], tmp_path, backbone="vgg16", freeze_backbone=False)
    train, _, vocab, _ = load_region_data(cfg)
    model = DenseCapModel(cfg, len(vocab)).train()
    assert model.recognition.projection is None and model.caption.args["in_dim"] == 4096
    assert model.recognition.head.training and not model.features.training  # dropout on, batch norm statistics fixed
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, cfg)
    batch = collate([RegionDataset(train, cfg.max_side)[i] for i in range(2)])
    out = model(*to_device(batch, model.bb, torch.device("cpu")))
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    after = model.state_dict()
    for name in ("features.0.weight", "recognition.head.0.weight", "rpn.conv.weight", "caption.out.weight"):
        assert not torch.equal(before[name], after[name]), f"{name} did not train"
    assert torch.equal(before["features.1.running_mean"], after["features.1.running_mean"])

    url = str(tmp_path / "vgg.pt")
    save_checkpoint(url, region_checkpoint(model, vocab))
    ckpt = load_checkpoint(url)
    assert {"head_state", "backbone_state"} <= set(ckpt) and "projection" not in ckpt and ckpt["projection_dim"] == 0
    rm = RegionModel(ModelConfig(backbone="vgg16", proposer="rpn", checkpoint=url, max_side=128, regions=4),
                     device="cpu")
    assert torch.equal(rm.backbone.head[0].weight, model.recognition.head[0].weight)
    assert torch.equal(rm.backbone.features[0].weight, model.features[0].weight)
    assert torch.equal(rm.rpn.conv.weight, model.rpn.conv.weight)
    dec = decode_image((shapes_data["root"] / "images" / "1000.jpg").read_bytes(), max_side=128)
    res = rm([dec.array], [(dec.width, dec.height)])[0]
    assert res["regions"].shape[1] == 4096 and res["global"].shape == (4096,)
    with pytest.raises(ValueError, match="trained on vgg16"):
        RegionModel(ModelConfig(backbone="mobilenet_v2", proposer="rpn", checkpoint=url), device="cpu")


# ------------------------------------------------------------------------------------- training and extraction


def _recall_through_region_model(ckpt: str, shapes_data: dict, image_ids: list[int], k: int = 10) -> float:
    model = RegionModel(ModelConfig(proposer="rpn", checkpoint=ckpt, max_side=128, regions=k), device="cpu")
    hits = total = 0.0
    for image_id in image_ids:
        dec = decode_image((shapes_data["root"] / "images" / f"{image_id}.jpg").read_bytes(), max_side=128)
        out = model([dec.array], [(dec.width, dec.height)])[0]
        assert out["boxes"].shape[0] <= k and (out["boxes"] >= 0).all() and (out["boxes"] <= SIZE).all()
        gt = torch.tensor(shapes_data["shapes"][image_id])
        hits += proposal_recall(torch.from_numpy(out["boxes"]), gt, 0.5) * len(gt)
        total += len(gt)
    return hits / total


def test_training_writes_a_loadable_checkpoint_and_improves_held_out_recall(trained: dict, shapes_data: dict,
                                                                             tmp_path: Path) -> None:
    hist = trained["result"]["history"]
    assert [h["epoch"] for h in hist] == list(range(EPOCHS + 1))
    untrained, final = hist[0], hist[-1]
    assert final["val_caption_loss"] < untrained["val_caption_loss"]
    assert final["val_recall"] > untrained["val_recall"]
    for k in ("train_loss", "train_objectness", "train_box", "train_caption"):
        assert hist[-1][k] < hist[1][k], (k, [h.get(k) for h in hist])

    ckpt = load_checkpoint(trained["checkpoint"])  # torch.load(weights_only=True) inside
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["backbone"] == "mobilenet_v2"
    assert ckpt["projection_dim"] == 64 and ckpt["projection"]["weight"].shape == (64, 1280)
    assert ckpt["rpn_args"]["anchor_sizes"] == [32.0, 64.0, 96.0] and "backbone_state" not in ckpt
    assert isinstance(ckpt["vocab"], list) and all(isinstance(w, str) for w in ckpt["vocab"])
    assert ckpt["caption_args"]["vocab_size"] == len(ckpt["vocab"])
    assert json.loads((trained["out"] / METRICS_FILE).read_text())["history"][-1]["epoch"] == EPOCHS

    # Held-out recall@IoU 0.5 of the top-10 proposals through extraction's RegionModel: trained > untrained (an RPN
    # with the same seed's random initialisation).
    _, val, vocab, _ = load_region_data(trained["cfg"])
    torch.manual_seed(trained["cfg"].seed)
    fresh = DenseCapModel(trained["cfg"], len(vocab))
    untrained_url = str(tmp_path / "untrained.pt")
    save_checkpoint(untrained_url, region_checkpoint(fresh, vocab))
    ids = val.image_ids.tolist()
    r_trained = _recall_through_region_model(trained["checkpoint"], shapes_data, ids)
    r_untrained = _recall_through_region_model(untrained_url, shapes_data, ids)
    print(f"\nheld-out recall@0.5 of top-10 proposals: untrained {r_untrained:.3f}, trained {r_trained:.3f}; "
          f"val caption loss {untrained['val_caption_loss']:.3f} -> {final['val_caption_loss']:.3f}")
    assert r_trained > r_untrained
    assert r_trained >= 0.3


def test_trained_rpn_boxes_sit_on_the_shapes(trained: dict, shapes_data: dict) -> None:
    model = RegionModel(ModelConfig(proposer="rpn", checkpoint=trained["checkpoint"], max_side=128, regions=10),
                        device="cpu")
    assert model.region_dim == 64 and model.dims["local"] == 64
    _, val, _, _ = load_region_data(trained["cfg"])
    best = []  # per held-out shape: the best IoU of a top-10 proposal
    for image_id in val.image_ids.tolist():
        dec = decode_image((shapes_data["root"] / "images" / f"{image_id}.jpg").read_bytes(), max_side=128)
        out = model([dec.array], [(dec.width, dec.height)])[0]
        assert out["regions"].shape == (out["boxes"].shape[0], 64) and np.isfinite(out["regions"]).all()
        assert np.all(np.diff(out["scores"]) <= 1e-6)
        shapes = torch.tensor(shapes_data["shapes"][image_id])
        best += box_iou(shapes, torch.from_numpy(out["boxes"])).max(1).values.tolist()
    print(f"\nbest IoU of a top-10 proposal per held-out shape: {np.round(best, 2)}")
    assert np.mean(np.asarray(best) >= 0.3) >= 0.75 and np.mean(best) >= 0.45


def test_checkpoint_runs_in_an_in_process_extraction_with_the_rpn_proposer(trained: dict, shapes_data: dict, tmp_path: Path) -> None:
    from pipeline.extract import driver
    from pipeline.extract.runners import LocalRunner
    from pipeline.store import feature_store as fstore

    out = tmp_path / "features"
    manifest = driver.run(ExtractConfig(input=str(shapes_data["root"] / "images"), output=str(out), proposer="rpn",
                                       checkpoint=trained["checkpoint"], max_side=128, regions=4, shard_size=16,
                                       batch_size=8, threads=1), LocalRunner())
    assert manifest["run"]["ok"] == 24 and manifest["run"]["errors"] == 0
    regions = fstore.read_live_table(str(out), "regions")
    assert regions.num_rows == manifest["run"]["regions"] and 24 <= regions.num_rows <= 96
    assert len(regions.column("descriptor")[0].as_py()) == 64


def test_checkpoint_with_other_pooling_is_refused(trained: dict) -> None:
    with pytest.raises(ValueError, match="region-pool gem"):
        RegionModel(ModelConfig(proposer="rpn", checkpoint=trained["checkpoint"], max_side=128, region_pool="mac"),
                    device="cpu")


def test_rerun_resumes_and_a_changed_config_is_refused(trained: dict) -> None:
    cfg = trained["cfg"]
    marker = read_state_marker(cfg.output)
    assert marker["epoch"] == EPOCHS
    with pytest.raises(ConfigError, match="another config"):
        prepare_data(replace(cfg, projection_dim=32))
    # Same config, one more epoch: resumes after the last one (no epoch-0 evaluation, no epoch 1 again).
    result = fit_local(replace(cfg, epochs=EPOCHS + 1), device="cpu")
    assert [h["epoch"] for h in result["history"]] == list(range(EPOCHS + 2))
    assert result["data"]["resume_after_epoch"] == EPOCHS


# --------------------------------------------------------------------------------------------------- Ray Train


def _job_main():
    """jobs/train_regions.py's main, imported from the checkout."""
    import importlib.util

    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        spec = importlib.util.spec_from_file_location("train_regions_job", ROOT / "jobs" / "train_regions.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "jobs"))
    return mod.main


def test_job_reports_bad_data_before_starting_ray(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main = _job_main()
    assert main(["--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "vg").mkdir()
    (tmp_path / "vg" / ANNOTATIONS).write_text('{"not": "a list"}')
    assert main(["--data", str(tmp_path / "vg"), "--output", str(tmp_path / "out")]) == 2
    assert "region_descriptions.json format" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--data", str(tmp_path / "vg"), "--output", str(tmp_path / "out"), "--workers", "0"])


@pytest.mark.slow
def test_training_runs_on_ray_train(shapes_data: dict, tmp_path: Path, ray_local: str) -> None:
    """One TorchTrainer worker on CPU in the session's local Ray (2 CPUs): same outputs as the in-process run."""
    cfg = tiny_config(shapes_data["root"], tmp_path / "ray_run", epochs=1, workers=1, use_gpu=False,
                      cpus_per_worker=1)
    result = fit(cfg)
    assert [h["epoch"] for h in result["history"]] == [0, 1]
    assert result["history"][1]["train_images"] == 18 and result["history"][1]["val_images"] == 6
    s = summary(result)
    assert s["final"]["epoch"] == 1 and s["untrained"]["val_recall"] == result["history"][0]["val_recall"]
    assert load_checkpoint(result["checkpoint"])["format"] == CHECKPOINT_FORMAT
    model = RegionModel(ModelConfig(proposer="rpn", checkpoint=result["checkpoint"], max_side=128, regions=5),
                        device="cpu")
    dec = decode_image((shapes_data["root"] / "images" / "1000.jpg").read_bytes(), max_side=128)
    assert 1 <= model([dec.array], [(dec.width, dec.height)])[0]["boxes"].shape[0] <= 5
