"""Everything about many processes: collectives, the engines that replicate and step the
model (DDP, DeepSpeed), global batch norm and gradient caching."""
