"""Entry point: scheduled re-indexing: incremental extraction, an index build into a new version, an atomic publish.

    python jobs/reindex.py --input s3://bucket/images/ --root s3://bucket/sigregions [--keep 3] [model flags]
    python jobs/reindex.py --root s3://bucket/sigregions --rollback
    ray job submit --working-dir . -- python jobs/reindex.py --input ... --root ...

Under --root: ``features/`` (only new or changed images are processed; removed ones are dropped), ``versions/<v>/``
(one index build per run that changed something), ``CURRENT`` (written last; ``jobs/search.py --index <root>``
follows it). The --keep newest complete versions are kept; --rollback points CURRENT at the one before.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from typing import Any

from pipeline.cli import build_parser as _build_parser
from pipeline.cli import run_job
from pipeline.config import ConfigError, ExtractConfig, HasStorage, IndexConfig, ModelConfig
from pipeline.store import versions as pub


def _opt(default: Any, help: str, **meta: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **meta})


_OWN = {  # fields of this job besides the extraction's and the index build's
    "root": (str, _opt("", "root URL: features/, versions/ and the CURRENT pointer live under it", required=True)),
    "keep": (int, _opt(3, f"complete index versions kept (>= {pub.MIN_KEEP}); older ones are deleted")),
    "force": (bool, _opt(False, "build and publish a new version even when no image changed")),
    "rollback": (bool, _opt(False, "point CURRENT back at the previous complete version, then exit (no --input)")),
}
_EXTRACT_ONLY = [f for f in dataclasses.fields(ExtractConfig)
                 if f.name not in {m.name for m in dataclasses.fields(ModelConfig)} | {"output"}]
_INDEX_ONLY = [f for f in dataclasses.fields(IndexConfig) if f.name not in ("features", "output", "storage_options")]


def _field(f: dataclasses.Field, **meta: Any) -> Any:
    return dataclasses.field(default=f.default, metadata={**f.metadata, **meta})


def _validate(self: Any) -> None:
    ModelConfig.validate(self)
    if not self.root:
        raise ConfigError("--root is required")
    if self.rollback:
        return
    if not self.input:
        raise ConfigError("--input is required (unless --rollback)")
    if self.keep < pub.MIN_KEEP:
        raise ConfigError(f"--keep must be >= {pub.MIN_KEEP}")
    self.extract_config()
    self.index_config("unused")


def _extract_config(self: Any) -> ExtractConfig:
    """The extraction part: ``--input`` into ``<root>/features``."""
    names = {f.name for f in dataclasses.fields(ExtractConfig)}
    cfg = ExtractConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names},
                        output=pub.features_url(self.root))
    cfg.validate()
    return cfg


def _index_config(self: Any, output: str) -> IndexConfig:
    """The index build part: ``<root>/features`` into ``output``."""
    names = {f.name for f in dataclasses.fields(IndexConfig)}
    cfg = IndexConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names},
                      features=pub.features_url(self.root), output=output)
    cfg.validate()
    return cfg


_INPUT_HELP = "directory/prefix URL of images, or a manifest (.parquet/.csv) (required unless --rollback)"
_EXTRACT_HINTS = typing.get_type_hints(ExtractConfig)
_INDEX_HINTS = typing.get_type_hints(IndexConfig)
ReindexConfig = dataclasses.make_dataclass(
    "ReindexConfig",
    [(f.name, _EXTRACT_HINTS[f.name], _field(f, required=False, help=_INPUT_HELP) if f.name == "input" else _field(f))
     for f in _EXTRACT_ONLY]
    + [(f.name, _INDEX_HINTS[f.name], _field(f)) for f in _INDEX_ONLY]
    + [(name, typ, fld) for name, (typ, fld) in _OWN.items()],
    bases=(ModelConfig, HasStorage), frozen=True,
    namespace={"validate": _validate, "extract_config": _extract_config, "index_config": _index_config,
               "__doc__": "`jobs/reindex.py`: the extraction's and the index build's options, plus the root's."},
)
ReindexConfig.__module__ = __name__


def build_parser():  # noqa: ANN201 - argparse.ArgumentParser
    """This job's argparse parser (one flag per ReindexConfig field)."""
    return _build_parser(ReindexConfig, "jobs/reindex.py", __doc__.splitlines()[0])


def _extract(ecfg: ExtractConfig, so: dict[str, Any]) -> dict[str, Any]:
    """The incremental extraction, on Ray (the cluster in RAY_ADDRESS, or a local instance) or in this process."""
    from pipeline.extract.worker import preflight, run_local

    preflight(ecfg, so)
    if ecfg.in_process:
        return run_local(ecfg)
    from pipeline.extract.ray_runner import init_ray, run_ray

    init_ray()
    return run_ray(ecfg)


def reindex(cfg: Any) -> dict[str, Any]:
    """One scheduled run: extract what changed, build a new version when the features changed, publish it last,
    prune old versions.

    Args:
        cfg: a ReindexConfig.

    Returns:
        A summary: the pointer, what the extraction did, the build's counts, the versions pruned.
    """
    from pipeline.reduce.build import build

    so = cfg.fs_options
    ecfg = cfg.extract_config()
    manifest = _extract(ecfg, so)
    run = manifest["run"]
    summary: dict[str, Any] = {"root": cfg.root, "extract": {k: run.get(k) for k in (
        "images", "ok", "errors", "skipped_already_done", "deleted")}, "live_images": manifest.get("live_images")}
    state = pub.features_state(ecfg.output, so)
    newest = None if cfg.force else pub.is_up_to_date(cfg.root, state, so)
    cur = pub.current(cfg.root, so)
    if newest is not None:
        # Nothing changed since the newest build: keep what is published (a rollback holds), or publish that build
        # when an earlier run stopped between its build and its publish.
        pointer = cur if cur is not None else pub.publish(cfg.root, newest, so, {"features_state": state})
        summary.update({"built": None, "up_to_date": newest})
    else:
        version = pub.new_version(cfg.root, so)
        out = pub.version_url(cfg.root, version)
        pub.write_source(cfg.root, version, {"features": ecfg.output, "features_state": state,
                                             "live_images": manifest.get("live_images"), "extract_run": run}, so)
        marker = build(cfg.index_config(out))
        pointer = pub.publish(cfg.root, version, so, {"features_state": state})
        summary["built"] = {"version": version, **{k: marker[k] for k in ("images", "regions", "factory", "seconds")}}
    summary["current"] = pointer
    summary["pruned"] = pub.prune(cfg.root, cfg.keep, so)
    return summary


def run(cfg: Any) -> int:
    if cfg.rollback:
        out: dict[str, Any] = {"root": cfg.root, "current": pub.rollback(cfg.root, cfg.fs_options)}
    else:
        out = reindex(cfg)
    print(json.dumps(out, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(ReindexConfig, argv, "jobs/reindex.py", __doc__.splitlines()[0], run)


if __name__ == "__main__":
    sys.exit(main())
