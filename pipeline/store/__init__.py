"""What jobs leave on storage: the feature store (shards, done-markers, live set), index folders and their versions."""
