"""Packaging and deployment agree with each other: one set of pinned versions for the tests, the image and the
cluster; the image's layers, tools and AMI; the license metadata."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name] = version
    return pins


def test_constraints_pin_what_the_cluster_must_agree_on_and_the_tests_run_it() -> None:
    pins = _pins()
    assert set(pins) >= {"ray", "torch", "torchvision", "faiss-cpu"}
    for name, version in pins.items():
        # The tests run against exactly the versions the image installs (make setup uses the same constraints).
        assert importlib.metadata.version(name).split("+")[0] == version, name
    assert "-c constraints.txt" in (REPO / "Makefile").read_text()
    rc = next(d for d in yaml.safe_load_all((REPO / "cluster/kuberay/raycluster.yaml").read_text())
              if d and d.get("kind") == "RayCluster")
    assert rc["spec"]["rayVersion"] == pins["ray"]


def test_the_image_pins_nothing_else_and_installs_dependencies_before_the_code() -> None:
    assert "-c constraints.txt" in DOCKERFILE
    # No second source of these versions: no framework base image, no inline pins.
    assert not re.search(r"^FROM\s+\S*(pytorch|rayproject)", DOCKERFILE, re.M | re.I)
    for name in _pins():
        assert f"{name}==" not in DOCKERFILE, name
    deps = DOCKERFILE.index("-c constraints.txt")
    assert deps < DOCKERFILE.index("COPY pipeline/")  # a code change does not reinstall torch
    # The cluster launcher's autoscaler on the head needs boto3 (AWS API), ssh and rsync (to reach workers).
    assert re.search(r"apt-get install[^\n]*openssh-client[^\n]*rsync", DOCKERFILE)
    assert "'.[cluster]'" in DOCKERFILE and "boto3" in PYPROJECT["project"]["optional-dependencies"]["cluster"]


def test_every_cluster_launcher_node_names_a_current_gpu_ami() -> None:
    aws = yaml.safe_load((REPO / "cluster/aws.yaml").read_text())
    for name, node in aws["available_node_types"].items():
        image = node["node_config"].get("ImageId", "")
        assert image.startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/") or image.startswith("ami-"), name


def test_the_reindex_cronjob_sends_its_token() -> None:
    cron = next(d for d in yaml.safe_load_all((REPO / "cluster/kuberay/reindex-cronjob.yaml").read_text())
                if d and d.get("kind") == "CronJob")
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert "RAY_AUTH_TOKEN" in {e["name"] for e in container["env"]}
    # `ray job submit` sends the token only in token mode.
    assert "export RAY_AUTH_MODE=token" in container["command"][-1]


def test_license_is_an_spdx_expression_with_its_file() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "Apache License" in (REPO / "LICENSE").read_text()[:200]
