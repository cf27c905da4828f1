"""Benchmarks: datasets and ground truth, protocols, metrics, the BoW baseline, reports and pictures."""
