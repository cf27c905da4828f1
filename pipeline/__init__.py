"""Significant-region feature extraction and retrieval pipeline (Xu et al., ChinaCom 2018)."""
