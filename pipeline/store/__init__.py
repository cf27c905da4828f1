"""What jobs leave on storage: the feature store (shards, done-markers, live set) and the published index versions."""
