"""Extraction: shard planning, the per-shard worker, and the runners (in-process, Ray) behind one driver."""
