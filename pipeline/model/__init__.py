"""The region model: backbones, region proposers, recognition network, pooling formulas, batching, composition."""
