"""Shard writers (`vlp shards build`) and webdataset loaders."""
