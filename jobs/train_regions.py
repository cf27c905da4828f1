"""Entry point: train the region model (RPN, recognition network, caption LSTM) on Visual Genome regions, on Ray Train.

    python jobs/train_regions.py --data /data/vg --output runs/rpn-mobilenet --epochs 10
    ray job submit --working-dir . -- python jobs/train_regions.py --data s3://bucket/vg \
        --image-dirs VG_100K,VG_100K_2 --output s3://bucket/models/rpn-mobilenet --workers 8 --use-gpu --batch-size 8

The final checkpoint is <output>/region_model.pt: `python jobs/extract.py --proposer rpn --checkpoint <that URL>`.
A rerun with the same --output resumes after the last finished epoch.
"""

from __future__ import annotations

import json
import sys

import _common  # noqa: F401  (puts the checkout on sys.path)

from pipeline.cli import run_job
from pipeline.densecap.config import TrainConfig
from pipeline.densecap.ray_train import fit, prepare_data, summary
from pipeline.extract.runners import init_ray


def train(cfg: TrainConfig) -> int:
    prepared = prepare_data(cfg)  # unreadable data, unwritable output, a resume with another config: before Ray
    init_ray()
    result = fit(cfg, prepared=prepared)
    print(json.dumps(summary(result), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(TrainConfig, argv, "jobs/train_regions.py", __doc__.splitlines()[0], train)


if __name__ == "__main__":
    sys.exit(main())
