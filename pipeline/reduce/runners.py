"""Where the index build's per-shard tasks run: in this process (LocalTaskRunner) or as Ray tasks (RayTaskRunner)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from pipeline.extract.runners import SHARD_ATTEMPTS, init_ray

log = logging.getLogger(__name__)


class TaskRunner(Protocol):
    """Runs one function over many task descriptions and returns the results, in the order of the tasks."""

    def map(self, fn: Callable[..., dict[str, Any]], tasks: Sequence[Any], *args: Any,
            on_done: Callable[[dict[str, Any]], None] | None = None, keep: bool = True) -> list[dict[str, Any]]:
        """``[fn(t, *args) for t in tasks]``; ``on_done`` sees each result as it arrives (in any order). With
        ``keep=False`` the results are only given to ``on_done`` and not returned (``[]``): a caller that folds
        results as they arrive (the build's sample) then holds none of them beyond its own state."""
        ...


class LocalTaskRunner:
    """Runs the tasks one after another in this process (tests, small corpora; the reference for the Ray runner)."""

    def map(self, fn: Callable[..., dict[str, Any]], tasks: Sequence[Any], *args: Any,
            on_done: Callable[[dict[str, Any]], None] | None = None, keep: bool = True) -> list[dict[str, Any]]:
        out = []
        for t in tasks:
            r = fn(t, *args)
            if on_done:
                on_done(r)
            if keep:
                out.append(r)
        return out


class RayTaskRunner:
    """Runs the tasks as Ray tasks (one CPU each), at most ``workers`` at once so that memory on a node is at most
    ``workers`` tasks' worth; a task that raised or whose worker died is retried by Ray up to ``SHARD_ATTEMPTS`` runs
    (tasks are idempotent: same files, marker last).

    Args:
        workers: tasks in flight at once (0 = the cluster's CPUs).
    """

    def __init__(self, workers: int = 0) -> None:
        self.workers = workers

    def map(self, fn: Callable[..., dict[str, Any]], tasks: Sequence[Any], *args: Any,
            on_done: Callable[[dict[str, Any]], None] | None = None, keep: bool = True) -> list[dict[str, Any]]:
        import ray

        init_ray()
        limit = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        remote = ray.remote(num_cpus=1, max_retries=SHARD_ATTEMPTS - 1, retry_exceptions=True)(fn)
        arg_refs = [ray.put(a) for a in args]  # shared by every task (the plan), stored once
        results: dict[int, dict[str, Any]] = {}
        inflight: dict[Any, int] = {}
        nxt = 0
        while nxt < len(tasks) or inflight:
            while nxt < len(tasks) and len(inflight) < limit:
                inflight[remote.remote(tasks[nxt], *arg_refs)] = nxt
                nxt += 1
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                k = inflight.pop(ref)
                r = ray.get(ref)  # raises after Ray's retries: a rerun resumes from the finished tasks
                if on_done:
                    on_done(r)
                if keep:
                    results[k] = r
                del r, ref  # with keep=False nothing refers to the result any more: Ray may free it
        return [results[k] for k in range(len(tasks))] if keep else []


def make_task_runner(in_process: bool, workers: int = 0) -> TaskRunner:
    """The runner a job's ``--in-process`` flag selects (as ``pipeline.extract.runners.make_runner``)."""
    return LocalTaskRunner() if in_process else RayTaskRunner(workers)
