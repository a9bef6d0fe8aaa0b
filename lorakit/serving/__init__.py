"""Using trained adapters: loading for inference, generation, merged exports, the adapter cache."""
