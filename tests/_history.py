"""Test helper: random multi-generation extraction histories (reruns with changed images, retries, deletions),
written as an output in either done-marker format, with the reference live set computed the old way (one dict)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.io import storage
from pipeline.store import feature_store as fstore

# Ids of varied lengths and scripts: UTF-8 byte order (Arrow's) must agree with Python's string order.
PREFIXES = ("a", "b/é", "b/z", "Z", "c/日本", "cc")


@dataclass(frozen=True)
class Event:
    """One done-marker of a history: a data shard (ids, fingerprints, retry ids) or a deletion."""

    shard: str
    generation: int
    kind: str
    ids: tuple[str, ...]
    fps: tuple[str, ...] = ()
    retry: tuple[str, ...] = ()

    def legacy(self) -> dict[str, Any]:
        """The format 1 (inline JSON) marker of this event."""
        if self.kind == "deleted":
            return {"shard": self.shard, "generation": self.generation, "kind": "deleted", "images": list(self.ids)}
        return {"shard": self.shard, "generation": self.generation, "kind": "data",
                "images": [[i, f] for i, f in zip(self.ids, self.fps)], "retry": list(self.retry)}


def universe(n: int) -> list[str]:
    """``n`` distinct ids."""
    return [f"{PREFIXES[i % len(PREFIXES)]}/{i:06d}.jpg" for i in range(n)]


def random_history(seed: int, n_ids: int = 200, generations: int = 5, contiguous: bool = True) -> list[Event]:
    """A random history: each generation reprocesses a random subset of ids (new or changed fingerprints), cut into
    shards of random size (cut from the sorted subset when ``contiguous``, as runs do; else from a shuffle, so shard
    ranges overlap), with random retry ids, then deletes some ids (live ones and never-seen ones).

    Returns:
        The events in shard-id order.
    """
    rng = np.random.default_rng(seed)
    ids = universe(n_ids)
    version = {i: 0 for i in ids}
    events: list[Event] = []
    for g in range(1, generations + 1):
        share = 0.8 if g == 1 else float(rng.uniform(0.05, 0.5))
        chosen = sorted(i for i in ids if rng.random() < share)
        for i in chosen:
            version[i] += int(rng.random() < 0.7)
        if not contiguous and g > 1:
            chosen = [chosen[k] for k in rng.permutation(len(chosen))]
        k = s = 0
        while k < len(chosen):
            size = int(rng.integers(1, 12))
            part = chosen[k:k + size]
            retry = tuple(i for i in part if rng.random() < 0.08)
            events.append(Event(fstore.shard_id(g, s), g, "data", tuple(part),
                                tuple(f"v{version[i]}" for i in part), retry))
            k += size
            s += 1
        if g > 1 and rng.random() < 0.8:
            gone = sorted({i for i in ids if rng.random() < 0.05} | {f"never/{g}-{j}" for j in range(2)})
            events.append(Event(f"g{g:05d}-deleted", g, "deleted", tuple(gone)))
    return events


def reference_live(events: list[Event]) -> dict[str, tuple[str, str]]:
    """The live set the old way: feature_store.live_images over the format 1 markers (one dict over every id)."""
    return fstore.live_images([e.legacy() for e in events])


def write_history(output: str, events: list[Event], legacy_until: int = 0, data: bool = True,
                  storage_options: dict[str, Any] | None = None) -> None:
    """Write a history as an output: generations <= ``legacy_until`` with format 1 JSON markers (as older versions
    wrote them), later ones with Parquet id lists; with ``data``, tiny images/regions files whose ``tag`` column
    names the shard (two region rows per image)."""
    for e in events:
        if data and e.kind == "data":
            p = fstore.shard_paths(output, e.shard)
            n = len(e.ids)
            storage.write_parquet(p["images"], pa.table({
                "image_id": list(e.ids), "fingerprint": list(e.fps),
                "status": ["read_error" if i in e.retry else "ok" for i in e.ids], "tag": [e.shard] * n}),
                storage_options)
            storage.write_parquet(p["regions"], pa.table({
                "image_id": [i for i in e.ids for _ in range(2)], "rank": [r for _ in e.ids for r in (1, 0)],
                "tag": [e.shard] * (2 * n)}), storage_options)
        if e.generation <= legacy_until:
            storage.write_json(fstore.shard_paths(output, e.shard)["done"], e.legacy(), storage_options)
        elif e.kind == "deleted":
            fstore.write_deletions(output, e.generation, list(e.ids), storage_options)
        else:
            fstore.write_data_marker(output, e.shard, e.generation, list(e.ids), list(e.fps), list(e.retry),
                                     storage_options, stats={"images": len(e.ids)})


def live_by_shard(live: dict[str, tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """A live dict grouped by shard: shard -> sorted [(id, fingerprint)]."""
    out: dict[str, list[tuple[str, str]]] = {}
    for i, (sid, fp) in sorted(live.items()):
        out.setdefault(sid, []).append((i, fp))
    return out
