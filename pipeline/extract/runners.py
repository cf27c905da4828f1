"""Runners: what turns a plan's shards into done-markers, in this process (LocalRunner) or on Ray (RayRunner)."""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from pipeline.config import ExtractConfig
from pipeline.extract.plan import Shard
from pipeline.extract.worker import ShardWorker, decode_shard

if TYPE_CHECKING:
    from pipeline.extract.driver import Progress

log = logging.getLogger(__name__)

SHARD_ATTEMPTS = 3  # runs of a shard (its actor died, or it raised: resubmitted) before the job fails


class Runner(Protocol):
    """Processes shards (decode, model, write: each ends with its done-marker) and returns their markers.

    Listing, planning and the manifest are the driver's (``pipeline.extract.driver.run``); a runner only decides
    where and how the per-shard work of ``pipeline.extract.worker`` runs. The driver calls ``start`` before it lists
    the input (so models can load meanwhile), then ``run`` if there are shards, and ``close`` at the end in any case.
    """

    def start(self, cfg: ExtractConfig) -> None:
        """Begin starting what ``run`` will need, without waiting for it."""
        ...

    def close(self) -> None:
        """Release whatever ``start`` or ``run`` started (idempotent)."""
        ...

    def run(self, cfg: ExtractConfig, shards: Sequence[Shard], progress: Progress) -> list[dict[str, Any]]:
        """Process every shard; call ``progress(done)`` as shards finish and ``progress(done, final=True)`` at the end.

        Returns:
            The done-markers written, one per shard.
        """
        ...


class LocalRunner:
    """Runs shards one after another in this process, without Ray (single machine, debugging, tests; the reference
    the Ray runner is compared against). It builds its model in ``run`` (a run with nothing to do builds none)."""

    def start(self, cfg: ExtractConfig) -> None:
        """Nothing to start ahead."""

    def close(self) -> None:
        """Nothing to release."""

    def run(self, cfg: ExtractConfig, shards: Sequence[Shard], progress: Progress) -> list[dict[str, Any]]:
        """Build the model here, then decode and process each shard in turn (see ``Runner.run``)."""
        so = cfg.fs_options
        worker = ShardWorker(cfg.model_config(), cfg.output, cfg.batch_size, cfg.float16, cfg.threads, so, cfg.pad_step)
        done: list[dict[str, Any]] = []
        def batch_done(n: int) -> None:
            progress.add(n)
            progress(done)

        for i, shard in enumerate(shards):
            dshard = decode_shard(shard, cfg.max_side, cfg.max_pixels, so, max_image_bytes=cfg.max_image_bytes)
            done.append(worker.run(dshard, batch_done))
            progress(done, final=i == len(shards) - 1)
        return done


class RayRunner:
    """Runs shards on a Ray cluster: one model actor per GPU fed by decode tasks on the CPUs, or on a CPU-only
    cluster one model actor per ``actor_cpus`` CPUs decoding its own shards (``actor_layout``).

    ``start`` joins the cluster in RAY_ADDRESS, or starts a local Ray instance, and starts the model actors and
    warms them (``ShardWorker.warm``) without waiting, so they load while the driver lists and plans the input. The
    driver calls it once the input and output are checked; a run that turns out to have nothing to do then stops the
    actors again (``close``). Each actor is given up to ``cfg.prefetch`` shards at once, decoded ahead of it (by
    decode tasks, or by the actor's other call threads) so that decoding, inference and writing overlap, and at most
    that many decoded shards exist at once (memory stays flat as the corpus grows). A shard whose call fails is
    resubmitted, up to ``SHARD_ATTEMPTS`` runs; a dead actor is replaced, and its shards go to the live ones.
    """

    def __init__(self) -> None:
        self.actors: list[Any] = []
        self.warming: list[Any] = []
        self.make_actor: Any = None
        self.actor_kwargs: dict[str, Any] = {}
        self.layout: ActorLayout | None = None
        self.cfg: ExtractConfig | None = None

    def start(self, cfg: ExtractConfig) -> None:
        """Start Ray (if needed) and the run's model actors, each asked to warm up; returns at once."""
        import ray

        if self.actors:
            return
        init_ray()
        res = ray.cluster_resources()
        layout = actor_layout(cfg, res.get("CPU", 1.0), res.get("GPU", 0.0))
        log.info("%d model actor(s), %.2g GPU, %.2g CPU and %d torch threads each; decoding %s", layout.actors,
                 layout.num_gpus, cfg.actor_cpus, layout.threads,
                 "in the model actors" if layout.decode_in_actor else "in CPU tasks feeding them")
        # No restarts by Ray: the driver replaces a dead actor itself and gives its shards to the live ones. Ray
        # restarting it in place (max_restarts=-1 with task retries) hung the run when the restart could not be
        # placed: with a node lost, the actors that died with it waited forever for CPUs the surviving actors hold,
        # and so did the shards queued on them. Shards are idempotent (same shard id, files overwritten, marker
        # last), so re-running one is safe. An actor that decodes its own shards runs ``prefetch`` calls at once: the
        # next shards decode in their threads while one holds the model.
        self.make_actor = ray.remote(num_cpus=cfg.actor_cpus, num_gpus=layout.num_gpus, max_restarts=0,
                                     max_task_retries=0,
                                     max_concurrency=cfg.prefetch if layout.decode_in_actor else 1)(ShardWorker).remote
        self.actor_kwargs = {"model_config": cfg.model_config(), "output": cfg.output, "batch_size": cfg.batch_size,
                             "float16": cfg.float16, "threads": layout.threads, "storage_options": cfg.fs_options,
                             "pad_step": cfg.pad_step}
        self.actors = [self.make_actor(**self.actor_kwargs) for _ in range(layout.actors)]
        self.warming = [a.warm.remote() for a in self.actors]
        self.layout = layout
        self.cfg = cfg

    def close(self) -> None:
        """Stop the model actors (also when the run failed: they would otherwise outlive it, holding their CPUs/GPUs,
        and a later run on the same cluster could wait forever for those resources)."""
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors, self.warming = [], []

    def run(self, cfg: ExtractConfig, shards: Sequence[Shard], progress: Progress) -> list[dict[str, Any]]:
        """Schedule the shards on the model actors (started now unless ``start`` did), and stop them at the end (see
        ``Runner.run``).

        Each actor holds at most ``cfg.prefetch`` shards. Once some actor has warmed up, shards go only to actors that
        have; a replacement still starting (or one that cannot be placed: its node was lost and the survivors' CPUs
        are held by their own actors) gets none while another actor is left. A shard whose call fails is
        resubmitted; when its actor died, the actor is replaced by a new one first.

        Raises:
            RuntimeError: a shard failed ``SHARD_ATTEMPTS`` times (raised once the shards in flight have finished, so
                their work is kept; rerunning the same command resumes).
        """
        import ray

        if self.cfg is not cfg:
            self.close()
            self.start(cfg)
        so = cfg.fs_options
        for extra in self.actors[len(shards):]:  # more actors than shards: the extra ones have nothing to do
            ray.kill(extra, no_restart=True)
        del self.actors[max(1, len(shards)):]
        actors = self.actors  # slots; a replaced actor's successor takes its slot (and close() stops it)
        n_actors = len(actors)
        warming = {ref: (a, actors[a]) for a, ref in enumerate(self.warming[:n_actors])}
        ready = [False] * n_actors  # warmed up
        spare = [False] * n_actors  # a replacement not warmed up yet: given shards only when no other actor is left
        in_actor = self.layout is not None and self.layout.decode_in_actor
        decode = ray.remote(num_cpus=1, max_retries=SHARD_ATTEMPTS)(decode_shard)
        counter = ray.remote(num_cpus=0)(ImageCounter).remote()  # the actors' image-level progress, batch by batch
        on_images = CountTo(counter)
        queue = deque((s, 1) for s in shards)
        inflight: dict[Any, tuple[Shard, int, int, Any]] = {}
        load = [0] * n_actors
        done: list[dict[str, Any]] = []

        def replace(a: int, why: str) -> None:
            log.warning("model actor %d is gone (%s); starting a replacement, its shards go to the others", a, why)
            ray.kill(actors[a], no_restart=True)
            actors[a] = self.make_actor(**self.actor_kwargs)
            ready[a], spare[a] = False, True
            warming[actors[a].warm.remote()] = (a, actors[a])

        failed: RuntimeError | None = None  # a shard out of attempts: no new work; what is in flight finishes
        try:
            while (queue and failed is None) or inflight:
                while queue and failed is None:
                    eligible = ([a for a in range(n_actors) if ready[a]] or
                                [a for a in range(n_actors) if not spare[a]] or range(n_actors))
                    a = min(eligible, key=load.__getitem__)
                    if load[a] >= cfg.prefetch:
                        break
                    shard, attempt = queue.popleft()
                    if in_actor:
                        ref = actors[a].decode_and_run.remote(shard, cfg.max_pixels, cfg.max_image_bytes, on_images)
                    else:
                        dref = decode.remote(shard, cfg.max_side, cfg.max_pixels, so,
                                             max_image_bytes=cfg.max_image_bytes)
                        ref = actors[a].run.remote(dref, on_images)
                    inflight[ref] = (shard, a, attempt, actors[a])
                    load[a] += 1
                ready_refs, _ = ray.wait([*inflight, *warming], num_returns=1, timeout=progress.tick_s)
                for ref in ready_refs:
                    if ref in warming:
                        a, actor = warming.pop(ref)
                        try:
                            ray.get(ref)
                            if actor is actors[a]:
                                ready[a], spare[a] = True, False
                        except ray.exceptions.RayError as e:  # its shard calls fail too, and replace it
                            log.warning("model actor %d did not warm up: %s", a, str(e).splitlines()[0])
                        continue
                    shard, a, attempt, actor = inflight.pop(ref)
                    load[a] -= 1
                    try:
                        done.append(ray.get(ref))
                    except ray.exceptions.RayError as e:
                        if isinstance(e, ray.exceptions.RayActorError) and actor is actors[a]:
                            replace(a, str(e).splitlines()[0])
                        if attempt >= SHARD_ATTEMPTS or failed is not None:
                            log.warning("shard %s failed (attempt %d): %s", shard.shard_id, attempt,
                                        str(e).splitlines()[0])
                            if failed is None:
                                failed = RuntimeError(f"shard {shard.shard_id} failed {attempt} times; rerun the "
                                                      f"same command to resume: {e}")
                                failed.__cause__ = e
                                if inflight:
                                    log.warning("letting the %d shard(s) in flight finish before failing",
                                                len(inflight))
                            continue
                        log.warning("shard %s failed (attempt %d), resubmitting: %s", shard.shard_id, attempt,
                                    str(e).splitlines()[0])
                        queue.append((shard, attempt + 1))
                progress.counted = ray.get(counter.total.remote())
                progress(done, final=not ((queue and failed is None) or inflight))
        finally:
            ray.kill(counter, no_restart=True)
            self.close()
        if failed is not None:
            raise failed
        return done


class ImageCounter:
    """A Ray actor counting the images the model actors finished (batch by batch), read by the driver."""

    def __init__(self) -> None:
        self.n = 0

    def add(self, n: int) -> None:
        """Count ``n`` more finished images."""
        self.n += n

    def total(self) -> int:
        """Images counted so far."""
        return self.n


class CountTo:
    """The ``on_images`` callback a model actor is given: adds to an ``ImageCounter`` without waiting for it."""

    def __init__(self, counter: Any) -> None:
        self.counter = counter

    def __call__(self, n: int) -> None:
        self.counter.add.remote(n)


def make_runner(in_process: bool) -> Runner:
    """The runner a job's ``--in-process`` flag selects: ``LocalRunner`` when set, else ``RayRunner``."""
    return LocalRunner() if in_process else RayRunner()


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (as under ``ray job submit``) or start a local Ray instance.

    Args:
        num_cpus: CPUs of a local instance (None = all).
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


@dataclass(frozen=True)
class ActorLayout:
    """How a run's model actors use the cluster (see ``actor_layout``)."""

    actors: int  # model actors
    num_gpus: float  # GPUs per actor
    threads: int  # torch CPU threads per actor
    decode_in_actor: bool  # actors decode their own shards (CPU-only clusters), else CPU tasks decode for them


def actor_layout(cfg: ExtractConfig, cluster_cpus: float, cluster_gpus: float) -> ActorLayout:
    """Model actors, their GPUs and torch threads, and where decoding runs, for a cluster (pure).

    Args:
        cfg: the run's config (``num_actors``, ``num_gpus``, ``threads``, ``actor_cpus``: 0/-1 = auto).
        cluster_cpus, cluster_gpus: the cluster's resources.

    Returns:
        On a cluster with GPUs: one actor per GPU (``num_gpus`` each), each with as many torch threads as CPUs it
        reserves (the GPU does the arithmetic; more threads would only compete with decoding), fed by decode tasks
        on the other CPUs. On a CPU-only cluster: one actor per ``actor_cpus`` CPUs (per ``threads`` CPUs when that
        is set and larger), the cluster's CPUs shared among them as torch threads, each actor decoding its own
        shards in threads while it infers. Several model replicas with few threads each beat one replica with every
        core as intra-op threads (on 2 cores: two 1-thread processes 31.9 images/s, one 2-thread process 24.4,
        BENCHMARKS.md); the actors own the cores, so there is no CPU left to reserve for decode tasks, and decoding
        in the actor keeps the pixels out of the object store. Explicit ``num_actors`` / ``threads`` win.
    """
    num_gpus = cfg.num_gpus if cfg.num_gpus >= 0 else (1.0 if cluster_gpus >= 1 else 0.0)
    per_actor = max(1, math.ceil(cfg.actor_cpus))
    if num_gpus > 0:
        actors = cfg.num_actors or max(1, int(cluster_gpus // num_gpus))
        return ActorLayout(actors, num_gpus, cfg.threads or per_actor, decode_in_actor=False)
    actors = cfg.num_actors or max(1, int(cluster_cpus // max(per_actor, cfg.threads)))
    # Shared, not per_actor each: 3 CPUs and actor_cpus 2 make one actor with 3 threads, not 2 (k actors on a node
    # each taking every core would run k x cores threads: oversubscribed intra-op threads stall on each other).
    threads = cfg.threads or max(1, int(cluster_cpus // actors))
    return ActorLayout(actors, 0.0, threads, decode_in_actor=True)
