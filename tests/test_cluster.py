"""End to end on a real multi-node Ray cluster: ``ray start --head`` + worker nodes on this machine, jobs through
``ray job submit --working-dir .`` (extract -> index -> benchmark), and an extraction that loses a node mid-way.

The cluster is private to this module: its own temp dir, free ports, an auth token of its own, nodes advertising
127.0.0.2 (loopback: Ray rewrites 127.0.0.1 to the machine's public address, any other 127/8 address it keeps), and
every process it started is killed by pid at the end. ``ray stop`` is never used: it kills every Ray process of the
machine, other people's included.
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
from typing import Any

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "caltech8"
VENV_BIN = Path(sys.executable).parent
NODE_IP = "127.0.0.2"
# Tiny model settings: every job in this module runs in seconds on 2 CPU cores.
TINY = ["--max-side", "64", "--regions", "3", "--shard-size", "4", "--batch-size", "4"]


def _free_port() -> int:
    """A TCP port free on every interface right now, outside Ray's default worker-port range (10002-19999)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc: children before they are reparented)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class LocalCluster:
    """A Ray cluster of several nodes on this machine, each node a ``ray start --block`` in its own session.

    Every node's processes are the descendants of its ``ray start`` process (the raylet's workers, the job
    supervisor and the driver it starts with ``start_new_session`` included), so a node is killed exactly, by pid.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.temp_dir = Path(tempfile.mkdtemp(prefix="sgr-ray-"))  # short: Ray's socket paths have a length limit
        self.gcs_port = _free_port()
        self.dashboard_port = _free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.token = secrets.token_hex(16)
        self.nodes: dict[str, subprocess.Popen] = {}
        self.seen: dict[str, set[int]] = {}  # every pid ever seen under a node, so late kills miss none
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update({
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` in job entrypoints = this venv
            "RAY_USAGE_STATS_ENABLED": "0",  # no usage reports leave the machine
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,  # our own token, not ~/.ray/auth_token
            # Notice a dead node in ~3 s instead of ~30 s (GCS health checks of raylets).
            "RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3",
            "NO_PROXY": "127.0.0.1,127.0.0.2,localhost", "no_proxy": "127.0.0.1,127.0.0.2,localhost",
        })
        self.env.pop("PYTHONPATH", None)

    # ---- processes -------------------------------------------------------------------------------------------

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        cmd = [str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address", NODE_IP, "--disable-usage-stats",
               "--object-store-memory", str(100 * 2**20),
               "--dashboard-agent-listen-port", str(_free_port()), *args]
        self.nodes[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.workdir)
        self.seen[name] = {self.nodes[name].pid}

    def start_head(self, num_cpus: int = 0) -> None:
        """The head: GCS, dashboard + job server on 127.0.0.1, no CPUs of its own by default (work goes to workers)."""
        self._start("head", ["--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(self.dashboard_port), "--include-dashboard", "true",
                             "--ray-client-server-port", str(_free_port()), "--num-cpus", str(num_cpus),
                             "--temp-dir", str(self.temp_dir)])
        self.wait_for(lambda: self._get("/api/version") is not None, 120, "the head's dashboard")

    def add_node(self, name: str, num_cpus: int) -> None:
        """A worker node joining the head (same machine, the head's temp dir), with a resource named after it."""
        self._start(name, ["--address", f"{NODE_IP}:{self.gcs_port}", "--num-cpus", str(num_cpus),
                           "--resources", json.dumps({f"node_{name}": 1})])
        self.wait_for(lambda: self.node_id(name) is not None, 120, f"node {name} to join")

    def node_id(self, name: str) -> str | None:
        """The node id of a live worker node (found by the resource named after it)."""
        return next((n["node_id"] for n in self.alive_nodes() if f"node_{name}" in (n.get("resources_total") or {})),
                    None)

    def _track(self) -> None:
        for name, p in self.nodes.items():
            self.seen[name].update(pid for pid in _descendants(p.pid))

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of one node at once (a machine that dies)."""
        self._track()
        pids = [p for p in self.seen[name] if _alive(p)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.nodes[name].wait(timeout=30)

    def shutdown(self) -> None:
        """Stop every process this cluster started: SIGTERM, a grace period, then SIGKILL the rest; remove temp."""
        self._track()
        for name in reversed(list(self.nodes)):  # workers first, the head last
            if self.nodes[name].poll() is None:
                self.nodes[name].terminate()
        deadline = time.time() + 15
        while time.time() < deadline and any(_alive(p) for s in self.seen.values() for p in s):
            self._track()
            time.sleep(0.5)
        self._track()
        for s in self.seen.values():
            for pid in s:
                if _alive(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        for p in self.nodes.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)

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
        """A job's info (status, message)."""
        return self._get(f"/api/jobs/{submission_id}") or {}

    @staticmethod
    def wait_for(cond: Any, timeout: float, what: str, every: float = 0.5) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if cond():
                return
            time.sleep(every)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}")

    # ---- jobs --------------------------------------------------------------------------------------------------

    def submit(self, entrypoint: list[str], submission_id: str | None = None, wait: bool = True,
               timeout: float = 300) -> subprocess.CompletedProcess:
        """``ray job submit --address <dashboard> --working-dir . [--no-wait] -- <entrypoint>`` from the checkout."""
        # The working dir uploaded is the checkout less .git, .venv and what .gitignore lists (runs/, caches).
        cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", self.dashboard, "--working-dir", "."]
        if submission_id:
            cmd += ["--submission-id", submission_id]
        if not wait:
            cmd.append("--no-wait")
        return subprocess.run([*cmd, "--", *entrypoint], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Head (no CPUs: it runs the job drivers) + two 2-CPU worker nodes, stopped whatever happens."""
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
    from pipeline import storage

    features, index, report = tmp_path / "features", tmp_path / "index", tmp_path / "report"
    out = _check(cluster.submit(["python", "jobs/extract.py", "--input", "data/caltech8", "--output", str(features),
                                 *TINY]), "extract")
    manifest = json.loads((features / "manifest.json").read_text())
    assert manifest["run"]["images"] == 80 and manifest["run"]["ok"] == 80 and manifest["live_images"] == 80
    assert manifest["config"]["input"] == "data/caltech8" and '"ok": 80' in out
    ids = storage.read_live_table(str(features), "images", columns=["status"]).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 80

    _check(cluster.submit(["python", "jobs/index.py", "--features", str(features), "--output", str(index)]), "index")
    done = json.loads((index / "_SUCCESS.json").read_text())
    assert done["images"] == 80 and done["regions"] == 80 * 3

    out = _check(cluster.submit(["python", "jobs/benchmark.py", "--dataset", "data/caltech8", "--protocol", "labels",
                                 "--features", str(features), "--report", str(report),
                                 "--methods", "global,ours,crow,crow+rerank"]), "benchmark")
    rep = json.loads((report / "report.json").read_text())
    assert [r["method"] for r in rep["rows"]] == ["global", "ours", "crow", "crow+rerank"]
    assert rep["images"] == 80 and rep["missing_images"] == 0 and rep["queries"] == 80
    # Real (ImageNet) weights on 8 visually distinct classes: far above chance (1/8 = 0.125).
    assert all(0.2 < r["score"] <= 1.0 for r in rep["rows"]), rep["rows"]
    assert (report / "report.md").exists() and "crow+rerank" in out
