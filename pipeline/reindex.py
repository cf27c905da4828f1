"""Scheduled re-indexing: incremental extraction under a root, an index build into a new version, publish, prune.

The one workflow that spans three rooms (``extract`` -> ``reduce`` -> ``store``), so it sits beside them rather than
inside one: under ``store/`` it would make the storage layer depend on extraction and the index build.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import ReindexConfig
from pipeline.extract import driver
from pipeline.extract.runners import Runner
from pipeline.store import versions as pub


def reindex(cfg: ReindexConfig, runner: Runner) -> dict[str, Any]:
    """One scheduled run: extract what changed, build a new version when the features changed, publish it last,
    prune old versions.

    Args:
        cfg: the re-index config.
        runner: what processes the extraction's shards (see ``pipeline.extract.runners.make_runner``).

    Returns:
        A summary: the pointer, what the extraction did, the build's counts, the versions pruned.
    """
    from pipeline.reduce.build import build  # lazily: faiss is only loaded when a build runs

    so = cfg.fs_options
    ecfg = cfg.extract_config()
    manifest = driver.run(ecfg, runner)
    run = manifest["run"]
    summary: dict[str, Any] = {"root": cfg.root, "extract": {k: run.get(k) for k in (
        "images", "ok", "errors", "skipped_already_done", "deleted")}, "live_images": manifest.get("live_images")}
    state = pub.features_state(ecfg.output, so)
    newest = None if cfg.force else pub.is_up_to_date(cfg.root, state, so)
    cur = pub.current(cfg.root, so)
    if newest is not None:
        # Nothing changed since the newest build. Keep what is published when it is that build or a deliberate
        # rollback (recorded in the pointer); otherwise an earlier run stopped between its build and its publish:
        # publish that build now.
        held = cur is not None and (cur["version"] == newest or cur.get("rolled_back_from"))
        pointer = cur if held else pub.publish(cfg.root, newest, so, {"features_state": state})
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
