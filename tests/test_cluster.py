"""End to end on a real multi-node Ray cluster: ``ray start --head`` + worker nodes on this machine, jobs through
``ray job submit --working-dir .`` (extract -> index -> benchmark), and an extraction that loses a node mid-way.

The cluster is private to this module: free ports, an auth token of its own, a temp dir per node, nodes advertising
127.0.0.2 (loopback: Ray rewrites 127.0.0.1 to the machine's public address, any other 127/8 address it keeps), and
every process it started is killed by pid at the end, whatever happens. ``ray stop`` is never used: it kills every
Ray process of the machine, other people's included.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "caltech8"
VENV_BIN = Path(sys.executable).parent
NODE_IP = "127.0.0.2"
# Tiny model settings: every job in this module runs in seconds on 2 CPU cores.
TINY = ["--max-side", "64", "--regions", "3", "--shard-size", "4", "--batch-size", "4"]


def _free_port() -> int:
    """A TCP port free right now, outside Ray's default worker-port range (10002-19999)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (0: state, 1: ppid, 19: start time), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _descendants(pid: int) -> dict[int, str]:
    """``pid`` and every live process below it, each with its start time.

    A pid is only ever killed while it still has the start time it had when seen, so a pid reused by someone else's
    process is never touched.
    """
    children: dict[int, list[int]] = {}
    start: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))) is not None and st[0] != "Z":
            children.setdefault(int(st[1]), []).append(int(d.name))
            start[int(d.name)] = st[19]
    out: dict[int, str] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        if p in start:
            out[p] = start[p]
        todo.extend(children.get(p, []))
    return out


def _same_alive(pid: int, start: str) -> bool:
    """Whether ``pid`` is still the (non-zombie) process that had this start time."""
    st = _stat(pid)
    return st is not None and st[0] != "Z" and st[19] == start


def _kill(procs: dict[int, str]) -> None:
    """SIGKILL each process that is still the one seen."""
    for pid, start in procs.items():
        if _same_alive(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class LocalCluster:
    """A Ray cluster of several nodes on this machine, each node a ``ray start --block`` in a session of its own.

    A node's processes are the descendants of its ``ray start`` process (the raylet's workers, and the job
    supervisor and the driver it starts with ``start_new_session``, included), so a node is killed exactly, by pid.

    Args:
        workdir: where the nodes' ``ray start`` output goes (``<name>.log``).
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.gcs_port = _free_port()
        self.dashboard_port = _free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.token = secrets.token_hex(16)
        self.nodes: dict[str, subprocess.Popen] = {}
        self.seen: dict[str, dict[int, str]] = {}  # per node: pid -> start time of every process seen under it
        self.temp_dirs: dict[str, Path] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
        self.env.update({
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` in job entrypoints = this venv
            "RAY_USAGE_STATS_ENABLED": "0",  # no usage reports leave the machine
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,  # a token of our own, not ~/.ray/auth_token
            # Declare a killed node dead after ~3 s instead of ~30 s (the GCS's health checks of raylets).
            "RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3",
            "NO_PROXY": "127.0.0.1,127.0.0.2,localhost", "no_proxy": "127.0.0.1,127.0.0.2,localhost",
        })

    # ---- processes -------------------------------------------------------------------------------------------

    def _start(self, name: str, args: list[str]) -> None:
        # Each node its own temp dir (short: Ray's socket paths have a length limit). Nodes sharing one would share
        # runtime_resources/, where every node re-extracts a job's working_dir (rmtree + unzip) when its first worker
        # for the job starts: the driver on the head would lose its current directory mid-job.
        self.temp_dirs[name] = Path(tempfile.mkdtemp(prefix=f"sgr-{name}-"))
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - the child keeps it
        cmd = [str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address", NODE_IP, "--disable-usage-stats",
               "--object-store-memory", str(100 * 2**20), "--temp-dir", str(self.temp_dirs[name]),
               "--dashboard-agent-listen-port", str(_free_port()), *args]
        try:
            self.nodes[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.workdir)
        finally:
            log.close()
        self.seen[name] = _descendants(self.nodes[name].pid)

    def start_head(self, num_cpus: int = 0) -> None:
        """The head: GCS, dashboard + job server on 127.0.0.1; no CPUs by default (it runs only the job drivers)."""
        self._start("head", ["--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(self.dashboard_port), "--include-dashboard", "true",
                             "--ray-client-server-port", str(_free_port()), "--num-cpus", str(num_cpus)])
        self.wait_for(lambda: self._get("/api/version") is not None and len(self.alive_nodes()) == 1, 180,
                      "the head", "head")

    def add_node(self, name: str, num_cpus: int) -> None:
        """A worker node joining the head, with a resource named after it (to find it in the state API)."""
        self._start(name, ["--address", f"{NODE_IP}:{self.gcs_port}", "--num-cpus", str(num_cpus),
                           "--resources", json.dumps({f"node_{name}": 1})])
        self.wait_for(lambda: self.node_id(name) is not None, 180, f"node {name} to join", name)

    def node_id(self, name: str) -> str | None:
        """The node id of a live worker node, or None."""
        return next((n["node_id"] for n in self.alive_nodes()
                     if f"node_{name}" in (n.get("resources_total") or {})), None)

    def _track(self) -> None:
        for name, p in self.nodes.items():
            self.seen[name].update(_descendants(p.pid))

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of one node at once: a machine that dies."""
        self._track()
        _kill(self.seen[name])
        self.nodes[name].wait(timeout=30)

    def shutdown(self) -> None:
        """Stop every process this cluster started (SIGTERM, a grace period, SIGKILL) and remove its temp dirs."""
        self._track()
        for name in reversed(list(self.nodes)):  # workers first, the head last
            if self.nodes[name].poll() is None:
                self.nodes[name].terminate()
        deadline = time.time() + 15
        while time.time() < deadline and any(_same_alive(p, t) for s in self.seen.values() for p, t in s.items()):
            self._track()
            time.sleep(0.5)
        self._track()
        for s in self.seen.values():
            _kill(s)
        for p in self.nodes.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for d in self.temp_dirs.values():
            shutil.rmtree(d, ignore_errors=True)

    def log(self, name: str) -> str:
        """The tail of a node's ``ray start`` output."""
        return (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]

    def wait_for(self, cond: Callable[[], Any], timeout: float, what: str, node: str | None = None,
                 every: float = 0.5) -> None:
        """Poll ``cond`` until true; fail with the node's output when it never is (or the node died)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if cond():
                return
            if node and self.nodes[node].poll() is not None:
                raise RuntimeError(f"node {node} exited while waiting for {what}:\n{self.log(node)}")
            time.sleep(every)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}" + (f":\n{self.log(node)}" if node else ""))

    # ---- the dashboard's HTTP API ----------------------------------------------------------------------------

    def _get(self, path: str) -> Any:
        req = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return None

    def alive_nodes(self) -> list[dict[str, Any]]:
        """Nodes the GCS believes alive (state API)."""
        r = self._get("/api/v0/nodes?limit=100&detail=true")
        rows = (r or {}).get("data", {}).get("result", {}).get("result", [])
        return [n for n in rows if n.get("state") == "ALIVE"]

    def actors(self) -> list[dict[str, Any]]:
        """Actors of the cluster (state API)."""
        r = self._get("/api/v0/actors?limit=1000&detail=true")
        return (r or {}).get("data", {}).get("result", {}).get("result", [])

    def job(self, submission_id: str) -> dict[str, Any]:
        """A submitted job's info (``status``, ``message``), {} when unknown."""
        return self._get(f"/api/jobs/{submission_id}") or {}

    # ---- jobs --------------------------------------------------------------------------------------------------

    def submit(self, entrypoint: list[str], submission_id: str | None = None, wait: bool = True,
               timeout: float = 300) -> subprocess.CompletedProcess:
        """``ray job submit --address <dashboard> --working-dir . [--no-wait] -- <entrypoint>`` from the checkout.

        The working dir uploaded is the checkout less .git, .venv and what .gitignore lists (runs/, caches): ~1 MB.
        """
        cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", self.dashboard, "--working-dir", "."]
        if submission_id:
            cmd += ["--submission-id", submission_id]
        if not wait:
            cmd.append("--no-wait")
        return subprocess.run([*cmd, "--", *entrypoint], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Head (0 CPUs: it runs the job drivers) + two 2-CPU worker nodes; every process stopped whatever happens."""
    c = LocalCluster(tmp_path_factory.mktemp("ray_cluster"))
    try:
        c.start_head()
        c.add_node("w1", 2)
        c.add_node("w2", 2)
        yield c
    finally:
        c.shutdown()


def _check(r: subprocess.CompletedProcess, what: str) -> str:
    """The job's output; fails the test with the CLI's output when the job did not succeed."""
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "succeeded" in out, f"{what} failed (rc {r.returncode}):\n{out[-6000:]}"
    return out


def test_jobs_end_to_end_through_ray_job_submit(cluster: LocalCluster, tmp_path: Path) -> None:
    """extract -> index -> benchmark, each one ``ray job submit --working-dir .`` on the multi-node cluster.

    The dataset path is relative (``data/caltech8``): it resolves inside the uploaded working dir. The head has no
    CPUs, so every decode task and model actor ran on the worker nodes.
    """
    from pipeline.store import feature_store as fstore

    features, index, report = tmp_path / "features", tmp_path / "index", tmp_path / "report"
    out = _check(cluster.submit(["python", "jobs/extract.py", "--input", "data/caltech8", "--output", str(features),
                                 *TINY]), "extract")
    manifest = json.loads((features / "manifest.json").read_text())
    assert manifest["run"]["images"] == 80 and manifest["run"]["ok"] == 80 and manifest["live_images"] == 80
    assert manifest["config"]["input"] == "data/caltech8" and '"ok": 80' in out
    ids = fstore.read_live_table(str(features), "images", columns=["status"]).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 80

    _check(cluster.submit(["python", "jobs/index.py", "--features", str(features), "--output", str(index)]), "index")
    done = json.loads((index / "_SUCCESS.json").read_text())
    assert done["images"] == 80 and done["regions"] == 80 * 3
    # One Ray task per feature shard built the parts (the head has no CPUs: on the workers); the exact index finds
    # every recall query's true top 10.
    assert done["tasks"]["count"] == len(done["parts"]) == len(list((features / "_done").glob("*.json")))
    assert done["recall"]["fused"]["value"] == 1.0 and not (index / "_work").exists()

    out = _check(cluster.submit(["python", "jobs/benchmark.py", "--dataset", "data/caltech8", "--protocol", "labels",
                                 "--features", str(features), "--report", str(report),
                                 "--methods", "global,ours,crow,crow+rerank"]), "benchmark")
    rep = json.loads((report / "report.json").read_text())
    assert [r["method"] for r in rep["rows"]] == ["global", "ours", "crow", "crow+rerank"]
    assert rep["images"] == 80 and rep["missing_images"] == 0 and rep["queries"] == 80
    # Real (ImageNet) weights on 8 visually distinct classes: far above chance (1/8 = 0.125).
    assert all(0.2 < r["score"] <= 1.0 for r in rep["rows"]), rep["rows"]
    assert (report / "report.md").exists() and "crow+rerank" in out


def test_scheduled_reindex_through_ray_job_submit(cluster: LocalCluster, tmp_path: Path) -> None:
    """What the CronJob runs (cluster/kuberay/reindex-cronjob.yaml): jobs/reindex.py submitted to the cluster,
    extraction on its workers, the index build in the driver, CURRENT published last."""
    from pipeline.retrieval.search import Searcher
    from pipeline.store import versions as publish

    images, root = tmp_path / "images", tmp_path / "live"
    for cls in sorted(p for p in SAMPLE.iterdir() if p.is_dir()):
        (images / cls.name).mkdir(parents=True)
        shutil.copy(sorted(cls.glob("*.jpg"))[0], images / cls.name)
    _check(cluster.submit(["python", "jobs/reindex.py", "--input", str(images), "--root", str(root), "--keep", "2",
                           "--pca-dim", "8", *TINY], submission_id=f"reindex-{secrets.token_hex(4)}"), "reindex")
    pointer = publish.current(str(root))
    assert pointer is not None and pointer["images"] == 8
    assert (root / pointer["path"] / "_SUCCESS.json").exists()
    searcher = Searcher(publish.resolve_index(str(root)), model=object())  # what jobs/search.py --index <root> opens
    ids = [i for i, _ in searcher.resolve(np.arange(int(searcher.meta["images"])))]
    assert sorted(ids) == sorted(str(p.relative_to(images)) for p in images.rglob("*.jpg"))


def test_extraction_survives_losing_a_node(cluster: LocalCluster, tmp_path: Path) -> None:
    """Kill the node running the model actor while an extraction runs: the job still completes (Ray restarts the
    actor on the surviving node and the driver resubmits the shards that died with it), or, should it fail, the same
    command run again completes it. Either way every image is there exactly once."""
    from pipeline.store import feature_store as fstore

    features = tmp_path / "features"
    cmd = ["python", "jobs/extract.py", "--input", str(SAMPLE), "--output", str(features), *TINY]
    total = 80 // 4
    sid = f"extract-node-loss-{secrets.token_hex(4)}"
    r = cluster.submit(cmd, submission_id=sid, wait=False)
    assert r.returncode == 0, r.stdout + r.stderr

    def done_shards() -> int:
        d = features / fstore.DONE_DIR
        return len(list(d.glob("*.json"))) if d.exists() else 0

    cluster.wait_for(lambda: done_shards() >= 2 or cluster.job(sid).get("status") in ("SUCCEEDED", "FAILED"), 240,
                     "the first shards")
    ray_job = cluster.job(sid).get("job_id")  # the driver's Ray job id (the submission id is ours)
    actor = next((a for a in cluster.actors() if a.get("class_name") == "ShardWorker" and a.get("state") == "ALIVE"
                  and a.get("job_id") == ray_job), None)
    assert actor is not None, f"no live model actor of job {ray_job}: {cluster.job(sid)}"
    victim = next(n for n in ("w1", "w2") if cluster.node_id(n) == actor["node_id"])
    at_kill = done_shards()
    cluster.kill_node(victim)
    assert at_kill < total, "the extraction finished before the node was killed: give it more work"

    cluster.wait_for(lambda: cluster.job(sid).get("status") in ("SUCCEEDED", "FAILED", "STOPPED"), 300, "the job")
    info = cluster.job(sid)
    logs = (cluster._get(f"/api/jobs/{sid}/logs") or {}).get("logs", "")
    resubmitted = [ln.split("WARNING", 1)[-1][:160] for ln in logs.splitlines() if "resubmitting" in ln]
    print(f"killed {victim} (the model actor's node) after {at_kill}/{total} shards; job {info['status']}; "
          f"driver resubmitted {len(resubmitted)} shard(s): {resubmitted}")
    if info["status"] != "SUCCEEDED":  # the documented fallback: rerun the same command, it resumes
        _check(cluster.submit(cmd), f"rerun after {info['status']}: {info.get('message', '')[-2000:]}")

    ids = fstore.read_live_table(str(features), "images", columns=["status"]).column("image_id").to_pylist()
    expected = sorted(str(p.relative_to(SAMPLE)) for p in SAMPLE.rglob("*.jpg"))
    assert len(ids) == len(set(ids)), "an image is there twice"
    assert sorted(ids) == expected, f"missing: {sorted(set(expected) - set(ids))[:5]}"
    manifest = json.loads((features / "manifest.json").read_text())
    assert manifest["live_images"] == 80
