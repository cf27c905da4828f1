"""Shard planning: what a run will do (pending images cut into shards, deletions), given what is already done."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pipeline.io import images as imgs
from pipeline.io import listing
from pipeline.store import feature_store as fstore


@dataclass(frozen=True)
class Shard:
    """The unit of work, failure and retry: a fixed list of images with a stable name."""

    shard_id: str
    generation: int
    records: tuple[listing.ImageRecord, ...]


@dataclass
class DecodedShard:
    """A shard's images decoded and resized on a CPU worker (what travels to the model actor)."""

    shard: Shard
    decoded: list[imgs.Decoded]
    read_s: float  # wall seconds of the whole fetch + decode
    fetch_s: float = 0.0  # seconds spent fetching bytes, summed over the fetch threads
    decode_s: float = 0.0  # seconds spent decoding and resizing, summed over the threads


@dataclass(frozen=True)
class Plan:
    """What a run will do: shards to process, ids to delete, and what is already done."""

    generation: int
    shards: list[Shard]
    deleted: list[str]
    skipped: int
    markers: list[dict[str, Any]]

    @property
    def images(self) -> int:
        """Images to process (in all shards)."""
        return sum(len(s.records) for s in self.shards)


def plan_shards(records: Sequence[listing.ImageRecord], markers: Sequence[dict[str, Any]], shard_size: int,
                storage_options: dict[str, Any] | None = None) -> Plan:
    """Plan a run: every listed image whose id and fingerprint are not already live in a done shard is pending;
    pending images are cut into shards of a new generation; live images no longer listed are deleted.

    Rerunning after a crash therefore redoes only unfinished shards' images, and rerunning after images were added
    or changed processes only those.

    The live set is resolved shard by shard (``feature_store.iter_live_ids``) and each shard's live ids are looked
    up in the sorted listing by binary search, so beyond the listing itself (already O(images)) planning adds two
    object arrays of references to the listing's own strings and a flag per record (17 bytes per listed image),
    the deleted ids, and one shard's resolution at a time: never a dict or set over every id.

    Args:
        records: the listed input, sorted by image_id (as listing.list_images returns it).
        markers: done-markers already under the output (read_done_markers, or format 1 dicts in memory).
        shard_size: images per shard.
        storage_options: fsspec options (to read the markers' id lists).

    Returns:
        The plan.
    """
    n = len(records)
    rid = np.empty(n, dtype=object)
    rid[:] = [r.image_id for r in records]
    rfp = np.empty(n, dtype=object)
    rfp[:] = [r.fingerprint for r in records]
    if n > 1 and not bool(np.all(rid[:-1] < rid[1:])):
        raise ValueError("records must be sorted by image_id with unique ids")
    done = np.zeros(n, dtype=bool)
    deleted: list[str] = []
    # Only the id lists are read: the refs' output (where data files are) is not needed here.
    refs = fstore.live_shard_refs("", storage_options, markers)
    for _, live in fstore.iter_live_ids(refs, storage_options):
        if not live.num_rows:
            continue
        ids = live.column("image_id").to_numpy(zero_copy_only=False)
        fps = live.column("fingerprint").to_numpy(zero_copy_only=False)
        # Within the listing's slice between the shard's first and last live id: fewer, cache-local compares.
        lo = int(np.searchsorted(rid, ids[0]))
        hi = int(np.searchsorted(rid, ids[-1], side="right"))
        pos = lo + np.searchsorted(rid[lo:hi], ids)
        found = pos < n
        found[found] = rid[pos[found]] == ids[found]
        same = found.copy()
        same[found] = rfp[pos[found]] == fps[found]
        done[pos[same]] = True
        deleted.extend(ids[~found].tolist())
    deleted.sort()
    pending = [r for r, d in zip(records, done) if not d]
    gen = fstore.next_generation(markers)
    shards = [Shard(fstore.shard_id(gen, i // shard_size), gen, tuple(pending[i:i + shard_size]))
              for i in range(0, len(pending), shard_size)]
    return Plan(gen, shards, deleted, n - len(pending), list(markers))
