"""Everything about many processes: collectives, the engines that replicate and step the
model (DDP, DeepSpeed), global batch norm and gradient caching."""

# train.engine's choices, built by engine.build_engine; here, not in engine.py, because the
# config reads them and the DeepSpeed engine imports the pretrainer, which imports the config
ENGINES = ("ddp", "deepspeed")
