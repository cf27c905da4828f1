"""The single I/O path: fsspec primitives (bytes, JSON, Parquet, npy, torch files), listing inputs, image decoding."""
