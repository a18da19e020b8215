"""DeepSpeed pipeline engines: build, plan, memory, checkpoints, topology. No training algorithm inside."""
