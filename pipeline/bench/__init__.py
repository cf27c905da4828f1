"""Benchmarks: ground truth (datasets, safe_pickle), corpus, methods, protocols, metrics, BoW baseline, reports."""
