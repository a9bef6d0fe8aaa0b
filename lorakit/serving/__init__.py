"""Using trained adapters: loading for inference, prompts files, generation, merged exports, the adapter cache."""
