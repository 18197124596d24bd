"""Training data: the shard format (`shards`), the dataset over it and the bucket sampler."""
