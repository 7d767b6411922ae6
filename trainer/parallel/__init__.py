"""Everything about many processes: collectives, the engines that replicate and step the
model (DDP, DeepSpeed; their registry in ``engines``), the device and its precision,
global batch norm and gradient caching."""
