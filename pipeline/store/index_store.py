"""The layout of a built index folder: the files the index job writes and search reads, the done-marker last."""

from __future__ import annotations

PCA_FUSED = "pca_fused.npz"
PCA_CROW = "pca_crow.npz"
INDEX_FUSED = "fused.faiss"
INDEX_CROW = "crow.faiss"
IDS = "ids.parquet"
REGIONS = "regions.npy"  # float16 (R, D): every image's region descriptors, L2-normalised, in index row order
OFFSETS = "region_offsets.npy"  # int64 (N + 1,)
RAW = "rerank_query.txt"  # which raw descriptor of a query is compared with regions
DONE = "_SUCCESS.json"  # the build's done-marker, written last: readers only trust a folder that has it
