"""DenseCap-style training on Visual Genome: config, vocab, data, model, loop, Ray Train, checkpoint."""
