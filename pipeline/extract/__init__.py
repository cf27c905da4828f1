"""Extraction: shard planning (plan), the per-shard worker (worker), runners behind one interface (runners), and the
one driver (driver.run) that lists, plans, runs and writes the manifest."""
