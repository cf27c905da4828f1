"""Tests for pipeline.config: strict parsing (dicts and CLI flags), validation, a stable config hash, redaction."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import build_parser, parse_args
from pipeline.config import (
    FUSE_GLOBALS,
    SECRET_FIELDS,
    BenchmarkConfig,
    ConfigError,
    ExtractConfig,
    IndexConfig,
    ModelConfig,
    ReindexConfig,
    SearchConfig,
    config_hash,
    from_dict,
    public_dict,
)

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-do-not-print-0b7e"
SECRET_OPTIONS = json.dumps({"key": "AKIAEXAMPLE", "secret": SECRET, "client_kwargs": {"endpoint_url": "http://x"}})


def _parse(argv: list[str]) -> ExtractConfig:
    return parse_args(ExtractConfig, argv, "extract", "test")


# ---- from_dict ---------------------------------------------------------------------------------------------------


def test_from_dict_coerces_strings_and_accepts_dashed_names():
    cfg = from_dict(ExtractConfig, {"output": "/tmp/o", "max-side": "64", "regions": 3, "float16": "yes",
                                    "actor_cpus": "0.5", "shard-size": "10", "backbone": "mobilenet_v2"})
    assert (cfg.max_side, cfg.regions, cfg.float16, cfg.actor_cpus, cfg.shard_size) == (64, 3, True, 0.5, 10)
    assert isinstance(cfg.max_side, int) and isinstance(cfg.actor_cpus, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_side = 1  # type: ignore[misc]


def test_from_dict_rejects_unknown_keys_with_the_key_in_the_message():
    with pytest.raises(ConfigError, match="max_sidee"):
        from_dict(ExtractConfig, {"output": "o", "max_sidee": 64})
    with pytest.raises(ConfigError, match="unknown option 'output'"):
        from_dict(ModelConfig, {"output": "o"})  # a field of another config


@pytest.mark.parametrize("key,value,match", [
    ("regions", "abc", "expected an integer"),
    ("regions", 1.5, "expected an integer"),  # no silent truncation
    ("regions", "1.5", "expected an integer"),
    ("regions", True, "expected an integer"),
    ("float16", "maybe", "expected a boolean"),
    ("float16", 2, "expected a boolean"),
    ("actor_cpus", "lots", "expected a number"),
    ("actor_cpus", "nan", "finite"),
    ("num_gpus", "inf", "finite"),
    ("input", 5, "expected a string"),
    ("backbone", "alexnet", "not one of"),
    ("proposer", "selective_search", "not one of"),
    ("region_pool", "avg", "not one of"),
])
def test_from_dict_rejects_bad_types_and_choices(key, value, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(ExtractConfig, {"output": "o", key: value})


@pytest.mark.parametrize("changes,match", [
    ({"regions": 0}, "regions"),
    ({"regions": 1001}, "regions"),
    ({"max_side": 16}, "max_side"),
    ({"max_side": 5000}, "max_side"),
    ({"shard_size": 0}, "shard_size"),
    ({"batch_size": 0}, "batch_size"),
    ({"prefetch": 0}, "prefetch"),
    ({"num_actors": -1}, "num_actors"),
    ({"threads": -2}, "threads"),
    ({"actor_cpus": -0.5}, "actor_cpus"),
    ({"num_gpus": -2}, "num_gpus"),
    ({"max_pixels": 0}, "max_pixels"),
    ({"output": ""}, "output"),
    ({"proposer": "rpn"}, "checkpoint"),
    ({"storage_options": "{not json"}, "not valid JSON"),
    ({"storage_options": "[1, 2]"}, "JSON object"),
    ({"region_scales": "0"}, "region_scales"),
    ({"region_scales": "0.7,abc"}, "not a number"),
    ({"region_scales": "1,1.0"}, "repeated"),
    ({"region_scales": "0.05"}, "under 32 pixels"),
    ({"region_scales": "nan"}, "region_scales"),
    ({"region_scales": ""}, "not a number"),
])
def test_from_dict_rejects_values_outside_their_domain(changes, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(ExtractConfig, {"output": "o", **changes})


def test_region_scales_parse_sorted_from_the_command_line():
    cfg = parse_args(ExtractConfig, ["--output", "o", "--region-scales", "1, 0.7"], "extract", "")
    assert cfg.scales() == (0.7, 1.0)
    assert ExtractConfig(output="o").scales() == (0.7, 1.0)
    assert ExtractConfig(output="o", region_scales="1").scales() == (1.0,)


def test_validate_also_guards_direct_construction_and_replace():
    base = ExtractConfig(output="o")
    base.validate()
    for bad in ({"backbone": "alexnet"}, {"num_gpus": float("nan")}, {"max_pixels": -1}):
        with pytest.raises(ConfigError):
            dataclasses.replace(base, **bad).validate()
    with pytest.raises(ConfigError, match="space"):
        SearchConfig(index="i", image="q", space="euclid").validate()
    with pytest.raises(ConfigError, match="finite"):
        IndexConfig(features="f", output="o", memory_budget_gb=float("inf")).validate()


def test_model_config_of_an_extract_config():
    cfg = from_dict(ExtractConfig, {"output": "o", "max_side": 64, "regions": 3, "shard_size": 7})
    mc = cfg.model_config()
    assert type(mc) is ModelConfig
    assert dataclasses.asdict(mc) == {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig)}
    assert config_hash(mc) == config_hash(ModelConfig(max_side=64, regions=3)) == mc.model_hash()


def test_fuse_global_is_one_option_with_the_same_default_and_choices_everywhere():
    """The fused vector's global part: the index build's option, the re-index's and the benchmark's, one set of
    choices and one default (global+rmac, what generalised: BENCHMARKS.md, issue 16); anything else is refused, also
    by a config built directly."""
    reindex = {"root": "/r", "input": "/in"}
    for cls, base in ((IndexConfig, {"features": "f", "output": "o"}), (ReindexConfig, reindex),
                      (BenchmarkConfig, {"report": "r"})):
        field = cls.__dataclass_fields__["fuse_global"]  # type: ignore[attr-defined]
        assert field.default == "global+rmac" and tuple(field.metadata["choices"]) == FUSE_GLOBALS, cls
        for kind in FUSE_GLOBALS:
            assert from_dict(cls, {**base, "fuse_global": kind}).fuse_global == kind
        with pytest.raises(ConfigError, match="fuse_global: 'gem' is not one of"):
            from_dict(cls, {**base, "fuse_global": "gem"})
        with pytest.raises(ConfigError, match="fuse_global"):
            cls(**base, fuse_global="global+gem").validate()
    assert from_dict(ReindexConfig, {**reindex, "fuse_global": "rmac"}).index_config("/v").fuse_global == "rmac"


# ---- CLI flags -----------------------------------------------------------------------------------------------------


def test_reindex_config_has_the_extractions_and_the_index_builds_options():
    """Every option of the extraction (but the model's, inherited, and --output) and of the index build (but
    --features, --output, --storage-options) is a re-index option with the same default and help (except --input's,
    which says when it is required); its parts come out validated."""
    def own(cls: type, drop: set[str]) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls) if f.name not in drop}

    model = {f.name for f in dataclasses.fields(ModelConfig)}
    fields = own(ReindexConfig, set())
    theirs = {**own(ExtractConfig, model | {"output"}), **own(IndexConfig, {"features", "output", "storage_options"})}
    assert set(fields) == model | set(theirs) | {"root", "keep", "force", "rollback"}
    for name, f in theirs.items():
        assert fields[name].default == f.default, name
        assert fields[name].metadata == f.metadata or name == "input", name
    cfg = from_dict(ReindexConfig, {"root": "/r", "input": "/in", "max_side": 64, "pca_dim": 8, "shard_size": 5})
    ecfg, icfg = cfg.extract_config(), cfg.index_config("/r/versions/v")
    assert (ecfg.input, ecfg.output, ecfg.max_side, ecfg.shard_size) == ("/in", "/r/features", 64, 5)
    assert (icfg.features, icfg.output, icfg.pca_dim) == ("/r/features", "/r/versions/v", 8)
    with pytest.raises(ConfigError, match="keep must be >= 2"):
        from_dict(ReindexConfig, {"root": "/r", "input": "/in", "keep": 1})


def test_parse_args_flags_defaults_and_booleans():
    cfg = _parse(["--output", "/tmp/o", "--max-side", "64", "--regions", "3", "--float16", "--shard-size", "5"])
    assert (cfg.output, cfg.max_side, cfg.regions, cfg.float16, cfg.shard_size) == ("/tmp/o", 64, 3, True, 5)
    assert cfg.batch_size == ExtractConfig.batch_size  # untouched flags keep the dataclass defaults
    assert _parse(["--output", "o", "--no-float16"]).float16 is False
    flags = {a.option_strings[0] for a in build_parser(ExtractConfig, "p", "d")._actions if a.option_strings}
    assert {"--max-side", "--storage-options", "--num-gpus", "--actor-cpus"} <= flags


@pytest.mark.parametrize("argv,match", [
    (["--output", "o", "--max-sid", "64"], "unrecognized arguments"),  # no prefix matching of flags
    (["--output", "o", "--shard", "5"], "unrecognized arguments"),
    (["--output", "o", "--colour", "red"], "unrecognized arguments"),
    (["--max-side", "64"], "--output"),  # required
    (["--output", "o", "--regions", "three"], "invalid int value"),
    (["--output", "o", "--max-side", "1.5"], "invalid int value"),
    (["--output", "o", "--regions", "0"], "regions must be"),
    (["--output", "o", "--backbone", "alexnet"], "invalid choice"),
    (["--output", "o", "--actor-cpus", "nan"], "finite"),
    (["--output", "o", "--storage-options", "{bad"], "not valid JSON"),
])
def test_parse_args_rejects_unknown_flags_and_bad_values(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(argv)
    assert e.value.code == 2
    assert match in capsys.readouterr().err


# ---- hash and redaction --------------------------------------------------------------------------------------------


def test_config_hash_is_stable_sensitive_and_ignores_secrets():
    a = from_dict(ModelConfig, {"max_side": 64, "regions": 3, "backbone": "mobilenet_v2"})
    b = from_dict(ModelConfig, {"backbone": "mobilenet_v2", "regions": "3", "max-side": "64"})  # other order, strings
    h = config_hash(a)
    assert h == config_hash(b) and len(h) == 12 and int(h, 16) >= 0
    assert config_hash(dataclasses.replace(a, regions=4)) != h
    assert config_hash(dataclasses.replace(a, max_side=65)) != h
    # Everything but the model fields leaves the model hash alone; credentials never enter any hash.
    e1 = from_dict(ExtractConfig, {"output": "o1", "max_side": 64, "regions": 3})
    e2 = from_dict(ExtractConfig, {"output": "o2", "max_side": 64, "regions": 3, "shard_size": 3, "batch_size": 2})
    assert config_hash(e1.model_config()) == config_hash(e2.model_config()) == h
    s1 = dataclasses.replace(e1, storage_options=SECRET_OPTIONS)
    assert config_hash(s1) == config_hash(dataclasses.replace(e1, storage_options='{"secret": "other"}'))


def test_config_hash_is_the_same_in_another_process():
    code = ("from pipeline.config import ModelConfig, config_hash; "
            "print(config_hash(ModelConfig(max_side=64, regions=3)))")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == config_hash(ModelConfig(max_side=64, regions=3))


def test_public_dict_redacts_secret_fields():
    cfg = from_dict(ExtractConfig, {"output": "o", "storage_options": SECRET_OPTIONS})
    d = public_dict(cfg)
    assert "storage_options" in SECRET_FIELDS
    assert d["storage_options"] == "<redacted>"
    assert SECRET not in json.dumps(d) and SECRET not in config_hash(cfg)
    assert d["output"] == "o" and d["max_side"] == cfg.max_side
    assert public_dict(ExtractConfig(output="o"))["storage_options"] == ""  # nothing to hide stays visible
    assert cfg.fs_options["secret"] == SECRET  # the real value is still usable


def test_errors_about_secret_fields_do_not_echo_the_value(capsys):
    with pytest.raises(ConfigError) as e:
        from_dict(ExtractConfig, {"output": "o", "storage_options": {"secret": SECRET}})  # a dict, not JSON text
    assert "storage_options" in str(e.value) and SECRET not in str(e.value)
    with pytest.raises(ConfigError) as e:
        from_dict(ExtractConfig, {"output": "o", "storage_options": '{"secret": "' + SECRET + '"'})  # broken JSON
    assert SECRET not in str(e.value)
    with pytest.raises(SystemExit):
        _parse(["--output", "o", "--storage-options", "[\"" + SECRET + "\"]"])
    assert SECRET not in capsys.readouterr().err
