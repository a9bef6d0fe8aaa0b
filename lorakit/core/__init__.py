"""The LoRA core: the arithmetic, the config, LoRA layers, adapters on a model, injection and merging."""
