"""Data: dataset sources, webdataset shard sets, and loaders."""
