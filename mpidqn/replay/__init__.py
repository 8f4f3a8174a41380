"""Replay shards: n-step accumulation, the transition ring, the frame-deduplicated ring, sampling, re-sharding."""
