"""The region model: backbones, input transform, proposers (activation, RPN), recognition, pooling, composition."""
