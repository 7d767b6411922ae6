"""Writing a shard corpus: ``audioclr shard`` and ``shard convert`` (the command, the
plan, the workers' encoding, the tar writer, the uploader) and the dataset layouts
(``sources``)."""
