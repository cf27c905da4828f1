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

from pipeline.config import ConfigError, parse_args
from pipeline.densecap.config import TrainConfig
from pipeline.densecap.ray_train import fit, prepare_data, summary
from pipeline.extract.ray_runner import init_ray
from pipeline.io.storage import StorageError


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(TrainConfig, argv, "jobs/train_regions.py", __doc__.splitlines()[0])
    _common.setup_logging()
    _common.log_config("train_regions", cfg)
    try:
        prepared = prepare_data(cfg)  # unreadable data, unwritable output, a resume with another config: before Ray
        init_ray()
        result = fit(cfg, prepared=prepared)
    except (StorageError, ConfigError) as e:
        print(f"jobs/train_regions.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
