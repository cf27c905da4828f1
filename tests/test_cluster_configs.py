"""The cluster configs under cluster/ (Ray cluster launcher, KubeRay) parse, agree with the Dockerfile (one image
name, one Ray version, Ray's ports) and with the jobs: every ``python jobs/X.py ...`` command line in them parses
with that job's own CLI parser and validates."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from pipeline.cli import build_parser, config_values, parse_args
from pipeline.config import (
    BenchmarkConfig,
    ConfigError,
    ExtractConfig,
    IndexConfig,
    ReindexConfig,
    SearchConfig,
    from_dict,
)

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))
IMAGE = (CLUSTER / "IMAGE").read_text().strip()
DOCKERFILE = (REPO / "Dockerfile").read_text()
RAY_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
COMMAND = re.compile(r"python3?\s+(?:\S*/)?jobs/(\w+)\.py\b")


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_docs() -> Iterator[tuple[Path, Any]]:
    for p in YAMLS:
        for d in _docs(p):
            yield p, d


def _walk(node: Any, key: str | None = None) -> Iterator[tuple[str | None, Any]]:
    """Every (key, scalar value) pair of a parsed YAML tree (list items carry their list's key)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)
    else:
        yield key, node


def _kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in _all_docs() if isinstance(d, dict) and d.get("kind") == kind]


def command_lines() -> list[tuple[Path, str, list[str]]]:
    """Every ``python jobs/X.py ...`` in the configs: (file, job name, argv), the argv cut at the end of the shell
    command (``;``, ``&&``, ``||``, ``|``, a line break)."""
    out = []
    for path, doc in _all_docs():
        for _, value in _walk(doc):
            if not isinstance(value, str):
                continue
            for m in COMMAND.finditer(value):
                rest = re.split(r";|&&|\|\||\||\n", value[m.end():], maxsplit=1)[0]
                out.append((path, m.group(1), shlex.split(rest)))
    return out


def test_every_yaml_parses_and_the_expected_files_exist() -> None:
    names = {p.relative_to(CLUSTER).as_posix() for p in YAMLS}
    assert {"aws.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob-extract.yaml", "kuberay/rayjob-index.yaml",
            "kuberay/rayjob-benchmark.yaml", "kuberay/reindex-cronjob.yaml"} <= names
    for p in YAMLS:
        assert _docs(p), f"{p} is empty"


def test_one_image_name_everywhere() -> None:
    """cluster/IMAGE is the one name: every image in every config is it; its tag is the project's version, which
    the Dockerfile's labels carry too. (The RayJobs name none: their submitter runs the RayCluster's head image.)"""
    name, tag = IMAGE.rsplit(":", 1)
    m = re.search(r'^version = "([^"]+)"$', (REPO / "pyproject.toml").read_text(), re.M)
    assert m
    version = m.group(1)
    assert name.rsplit("/", 1)[-1] == "sigregions" and tag == version
    assert f'org.opencontainers.image.version="{version}"' in DOCKERFILE
    assert 'org.opencontainers.image.title="sigregions"' in DOCKERFILE
    named = set()
    for p in YAMLS:
        images = [v for k, v in _walk(_docs(p)) if k in ("image", "head_image", "worker_image")]
        assert set(images) <= {IMAGE}, f"{p}: {images} != {IMAGE}"
        if images:
            named.add(p.relative_to(CLUSTER).as_posix())
    assert named == {"aws.yaml", "kuberay/raycluster.yaml", "kuberay/reindex-cronjob.yaml"}


def test_ray_ports_and_version_agree_with_the_dockerfile() -> None:
    expose = re.search(r"^EXPOSE\s+(.+)$", DOCKERFILE, re.M)
    assert expose and {int(x) for x in expose.group(1).split()} >= set(RAY_PORTS.values())
    ray_version = re.search(r"^ray==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)
    assert ray_version and "-c constraints.txt" in DOCKERFILE  # the one place Ray's version is pinned
    (_, rc), = _kind("RayCluster")
    assert rc["spec"]["rayVersion"] == ray_version.group(1)
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in head["ports"]} == RAY_PORTS
    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    assert any(f"--port={RAY_PORTS['gcs-server']}" in c for c in aws["head_start_ray_commands"])
    assert any(f":{RAY_PORTS['gcs-server']}" in c for c in aws["worker_start_ray_commands"])
    # The scheduled job reaches the job server through KubeRay's head service, on the dashboard port.
    (_, cron), = _kind("CronJob")
    env = {e["name"]: e.get("value") for e in cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
           ["env"]}
    assert env["RAY_API_SERVER_ADDRESS"] == f"http://{rc['metadata']['name']}-head-svc:{RAY_PORTS['dashboard']}"


def test_kuberay_manifests() -> None:
    """RayCluster: autoscaling GPU workers from 0, no tasks on the head; RayJobs and the CronJob use that cluster."""
    (_, rc), = _kind("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1" and rc["spec"]["enableInTreeAutoscaling"] is True
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (gpu,) = rc["spec"]["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1 and gpu["replicas"] == 0
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    jobs = _kind("RayJob")
    assert {p.name for p, _ in jobs} == {"rayjob-extract.yaml", "rayjob-index.yaml", "rayjob-benchmark.yaml"}
    for p, job in jobs:
        assert job["apiVersion"] == "ray.io/v1", p
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": rc["metadata"]["name"]}, p
        assert COMMAND.match(job["spec"]["entrypoint"]), p
    (_, cron), = _kind("CronJob")
    assert cron["apiVersion"] == "batch/v1" and len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"  # runs over one root must not overlap
    script = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert "ray job submit" in script and "jobs/reindex.py" in script and "--no-wait" not in script


def test_aws_launcher_config_is_valid() -> None:
    """The launcher's own schema validation (merged with its AWS defaults, offline), GPU workers from 0."""
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    validate_config(fillout_defaults(aws))
    assert aws["docker"]["image"] == IMAGE
    head = aws["available_node_types"][aws["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    (gpu_type,) = [t for n, t in aws["available_node_types"].items() if n != aws["head_node_type"]]
    assert gpu_type["min_workers"] == 0 and 1 <= gpu_type["max_workers"] <= aws["max_workers"]
    assert gpu_type["node_config"]["InstanceType"].startswith(("g4dn.", "g5.", "g6.", "p3.", "p4d.", "p5."))


CONFIGS = {"extract": ExtractConfig, "index": IndexConfig, "benchmark": BenchmarkConfig, "search": SearchConfig,
           "reindex": ReindexConfig}


def _flags(job: str) -> set[str]:
    """The option strings of a job's own parser."""
    parser = build_parser(CONFIGS[job], job, "")
    return {o for a in parser._actions for o in a.option_strings}


def _parse(job: str, argv: list[str]) -> Any:
    """A job's config from its command line, through the job's own parser (SystemExit / ConfigError when wrong).

    Every job parses with ``parse_args`` of its config class; for jobs/reindex.py the config is validated outside
    argparse, so that a ConfigError (not argparse's exit) is what the checks below see.
    """
    if job == "reindex":
        ns = build_parser(ReindexConfig, "jobs/reindex.py", "").parse_args(argv)
        return from_dict(ReindexConfig, config_values(ns))
    return parse_args(CONFIGS[job], argv, f"jobs/{job}.py", "")


def test_every_job_command_line_parses_with_the_jobs_own_flags(capsys: pytest.CaptureFixture) -> None:
    """Each ``python jobs/X.py --flag ...`` in the configs: every flag is one of the job's flags (its argparse parser,
    built from the job's config dataclass), values have the right types and the config validates."""
    lines = command_lines()
    assert {job for _, job, _ in lines} >= {"extract", "index", "benchmark", "reindex"}
    for path, job, argv in lines:
        assert job in CONFIGS or job == "reindex", f"{path}: unknown job jobs/{job}.py"
        flags = {a.split("=", 1)[0] for a in argv if a.startswith("-")}
        assert flags <= _flags(job), f"{path}: jobs/{job}.py has no {sorted(flags - _flags(job))}"  # no abbreviations
        try:
            _parse(job, argv)
        except (SystemExit, ConfigError) as e:
            pytest.fail(f"{path}: `jobs/{job}.py {shlex.join(argv)}` is rejected: {e} "
                        f"{capsys.readouterr().err.strip()}")


def test_the_configs_chain_the_jobs() -> None:
    """The index job reads what the extract job writes; the schedule's root is its own."""
    by_job: dict[str, list[Any]] = {}
    for _, job, argv in command_lines():
        by_job.setdefault(job, []).append(_parse(job, argv))
    (extract,), (index,), (reindex,) = by_job["extract"], by_job["index"], by_job["reindex"]
    assert index.features == extract.output and index.output != extract.output
    assert extract.num_gpus == 1 and extract.num_actors >= 1  # GPU workers may be at 0 when the job starts
    assert reindex.num_gpus == 1 and reindex.keep >= 2
    assert not reindex.root.startswith(extract.output) and not extract.output.startswith(reindex.root)


def test_parser_check_catches_a_wrong_flag(capsys: pytest.CaptureFixture) -> None:
    """The check above is not vacuous: an unknown flag or a bad value is rejected."""
    with pytest.raises(SystemExit):
        parse_args(ExtractConfig, ["--output", "x", "--no-such-flag", "1"], "jobs/extract.py", "")
    with pytest.raises(SystemExit):
        parse_args(IndexConfig, ["--features", "a", "--output", "b", "--pca-dim", "many"], "jobs/index.py", "")
    with pytest.raises(SystemExit):
        _parse("reindex", ["--root", "r", "--input", "i", "--keepp", "3"])
    with pytest.raises(ConfigError):
        _parse("reindex", ["--root", "r"])  # --input is required unless --rollback
    assert _parse("reindex", ["--root", "r", "--rollback"]).rollback
    capsys.readouterr()
