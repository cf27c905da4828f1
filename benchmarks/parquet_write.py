"""Parquet write cost and size of an extraction's shard tables: dictionary encoding on every column (pyarrow's default)
against only the columns whose values repeat (``pipeline.io.storage.parquet_bytes``).

    python benchmarks/parquet_write.py --features runs/caltech101-ms/features --shards 4

For each of the first ``--shards`` shards it reads the images and regions tables back and encodes each one ``--repeat``
times per setting (zstd in both), printing the best time and the bytes.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from pipeline.io import storage  # noqa: E402
from pipeline.store import feature_store as fstore  # noqa: E402


def encode(table: pa.Table, use_dictionary: bool | list[str], repeat: int) -> tuple[float, int]:
    """Best seconds over ``repeat`` encodings, and the bytes."""
    best, size = float("inf"), 0
    for _ in range(repeat):
        buf = io.BytesIO()
        t0 = time.perf_counter()
        pq.write_table(table, buf, compression="zstd", use_dictionary=use_dictionary)
        best = min(best, time.perf_counter() - t0)
        size = len(buf.getvalue())
    return best, size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--features", required=True, help="an extraction output")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    markers = sorted(fstore.read_done_markers(args.features), key=lambda m: m["shard"])[: args.shards]
    if not markers:
        raise SystemExit(f"no finished shards under {args.features}")
    tot = {"all": [0.0, 0], "repeating": [0.0, 0]}
    print("shard, table, rows: every column (ms, KiB) | repeating columns only (ms, KiB)")
    for m in markers:
        paths = fstore.shard_paths(args.features, m["shard"])
        for kind in ("images", "regions"):
            url = paths[kind]
            table = storage.read_parquet(url)
            a = encode(table, True, args.repeat)
            b = encode(table, storage.dictionary_columns(table.schema), args.repeat)
            for k, (s, n) in (("all", a), ("repeating", b)):
                tot[k][0] += s
                tot[k][1] += n
            print(f"{m['shard']} {kind:>7} {table.num_rows:6d}: {a[0] * 1e3:7.1f} ms {a[1] / 1024:8.0f} KiB | "
                  f"{b[0] * 1e3:7.1f} ms {b[1] / 1024:8.0f} KiB")
    (ta, na), (tb, nb) = tot["all"], tot["repeating"]
    print(f"total: every column {ta:.3f} s {na / 2**20:.2f} MiB | repeating only {tb:.3f} s {nb / 2**20:.2f} MiB | "
          f"{ta / tb:.2f}x faster, {na / nb:.2f}x smaller")
    return 0


if __name__ == "__main__":
    sys.exit(main())
