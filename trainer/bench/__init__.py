"""The ``audioclr bench`` commands, one module each: ``data`` (the loaders against the decode
limit), ``train`` (the training step against a bare PyTorch loop), ``quality`` (pretraining
scored on real audio), ``memory`` (each rank's model state under DDP and ZeRO, counted by
``census``), ``gradcache`` (a step's peak memory with and without gradient caching) and
``scale`` (costs as the corpus grows)."""
