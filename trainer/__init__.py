"""Engine glue: config, partitioning, the DeepSpeed PipelineModule, checkpoints, stage recipes.
The model code in `models/` never imports from here."""
