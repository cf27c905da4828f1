"""DenseCap-style training of the region model on Visual Genome: data, model and losses, loop, Ray Train, checkpoint."""
