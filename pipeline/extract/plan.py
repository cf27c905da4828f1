"""Shard planning: what a run will do (pending images cut into shards, deletions), given what is already done."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

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


def plan_shards(records: Sequence[listing.ImageRecord], markers: Sequence[dict[str, Any]], shard_size: int) -> Plan:
    """Plan a run: every listed image whose id and fingerprint are not already live in a done shard is pending;
    pending images are cut into shards of a new generation; live images no longer listed are deleted.

    Rerunning after a crash therefore redoes only unfinished shards' images, and rerunning after images were added
    or changed processes only those.

    Args:
        records: the listed input, sorted by image_id.
        markers: done-markers already under the output.
        shard_size: images per shard.

    Returns:
        The plan.
    """
    live = fstore.live_images(markers)
    pending = [r for r in records if live.get(r.image_id, ("", None))[1] != r.fingerprint]
    listed = {r.image_id for r in records}
    deleted = sorted(set(live) - listed)
    gen = fstore.next_generation(markers)
    shards = [Shard(fstore.shard_id(gen, i // shard_size), gen, tuple(pending[i:i + shard_size]))
              for i in range(0, len(pending), shard_size)]
    return Plan(gen, shards, deleted, len(records) - len(pending), list(markers))
