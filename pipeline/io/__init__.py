"""The single I/O path: fsspec primitives (bytes, JSON, Parquet), listing inputs and manifests, image decoding."""
