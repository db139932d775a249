"""Shard pipelines, transforms, shard writer, shapes data and token shards."""
