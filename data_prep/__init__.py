"""The prep stage: clips -> reviewed captions -> latent shards (issue #3)."""
