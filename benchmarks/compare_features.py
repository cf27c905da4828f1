"""Compare two extraction outputs row by row: the same live image ids, and every vector and region column equal
(bitwise by default, or within --atol). Prints one line per column; exit 1 when anything differs.

    python benchmarks/compare_features.py runs/old/features runs/new/features [--atol 1e-6]

Used to check that a refactor changed no output (the redesign: old main vs new on `make demo`'s extraction) and,
with a tolerance, that a faster path (batched on-device work, mixed precision) stays close to today's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.schema import VECTOR_COLUMNS, column_to_numpy  # noqa: E402
from pipeline.store import feature_store as fstore  # noqa: E402

REGION_COLUMNS = ("descriptor", "box", "score")


def compare(a: str, b: str, atol: float = 0.0) -> list[tuple[str, str, tuple[int, ...], float]]:
    """Every compared column's largest absolute difference.

    Args:
        a: one extraction output URL.
        b: the other.
        atol: the largest difference that still counts as equal (0: bitwise).

    Returns:
        (kind, column, shape, max abs difference) per column.

    Raises:
        ValueError: the two outputs do not hold the same live images (or regions) in the same order.
    """
    out = []
    for kind, cols in (("images", VECTOR_COLUMNS), ("regions", REGION_COLUMNS)):
        ta, tb = fstore.read_live_table(a, kind), fstore.read_live_table(b, kind)
        if ta.column("image_id").to_pylist() != tb.column("image_id").to_pylist():
            raise ValueError(f"{kind}: the two outputs hold different images")
        for c in cols:
            x = column_to_numpy(ta, c) if c != "score" else ta.column(c).to_numpy()
            y = column_to_numpy(tb, c) if c != "score" else tb.column(c).to_numpy()
            if x.shape != y.shape:
                raise ValueError(f"{kind}.{c}: shapes {x.shape} != {y.shape}")
            out.append((kind, c, x.shape, float(np.abs(x.astype(np.float64) - y).max()) if x.size else 0.0))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--atol", type=float, default=0.0, help="largest absolute difference counted as equal")
    args = p.parse_args()
    rows = compare(args.a, args.b, args.atol)
    for kind, c, shape, diff in rows:
        verdict = "identical" if diff == 0 else ("within atol" if diff <= args.atol else "DIFFERS")
        print(f"{kind}.{c} {shape}: max abs diff {diff:.3g} ({verdict})")
    return 0 if all(d <= args.atol for *_, d in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
