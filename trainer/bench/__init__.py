"""The ``audioclr bench`` commands: ``data`` (the loaders against the decode limit), ``train``
(the training step against a bare PyTorch loop) and ``quality`` (pretraining scored on real audio)."""
