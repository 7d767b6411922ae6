"""Reading a shard corpus: its manifest, the tar reader, shards behind a URL and their
node-local cache, the per-reader sample streams, and ``check-shards``."""
