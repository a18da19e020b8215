"""Pipeline layers for the supported architectures (plain nn.Modules, no torch.distributed).

`models.pipeline` builds the ordered pipe-layer list and the HF <-> pipe key mapping; the
architecture modules (`llama`, `qwen2`, `qwen3`, `mistral`, `gemma3`, `bloom`) hold the layer
classes; `models.registry` maps an HF `config.model_type` to its architecture. Nothing here touches
the DeepSpeed engine except the small spec builder in `models.pipeline`, which returns
`LayerSpec`/`TiedLayerSpec` lists.
"""
