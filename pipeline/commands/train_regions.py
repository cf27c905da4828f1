"""Train the region model (RPN, recognition network, caption LSTM) on Visual Genome regions, on Ray Train.

examples:
  sigregions train --data /data/vg --output runs/rpn-mobilenet --epochs 10
  ray job submit --working-dir . -- python jobs/train_regions.py --data s3://bucket/vg \
      --image-dirs VG_100K,VG_100K_2 --output s3://bucket/models/rpn-mobilenet --workers 8 --use-gpu --batch-size 8

The final checkpoint is <output>/region_model.pt: `sigregions extract --proposer rpn --checkpoint <that URL>`.
A rerun with the same --output resumes after the last finished epoch.
"""

from __future__ import annotations

import json

from pipeline.cli import run_job
from pipeline.densecap.config import TrainConfig
from pipeline.densecap.ray_train import fit, prepare_data, summary
from pipeline.extract.runners import init_ray


def train(cfg: TrainConfig) -> int:
    """Train (or resume) and print the run's summary as JSON.

    Args:
        cfg: the training's config.

    Returns:
        The exit code.
    """
    prepared = prepare_data(cfg)  # unreadable data, unwritable output, a resume with another config: before Ray
    init_ray()
    result = fit(cfg, prepared=prepared)
    print(json.dumps(summary(result), indent=2))
    return 0


def main(argv: list[str] | None = None, prog: str = "jobs/train_regions.py") -> int:
    """Parse flags and run; user errors are one line and exit code 2 (see pipeline.cli.run_job)."""
    return run_job(TrainConfig, argv, prog, __doc__, train)
