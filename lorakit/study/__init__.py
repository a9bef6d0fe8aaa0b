"""`lorakit study`: grids of training runs (ranks, target sets, data sizes, learning rates, full fine-tuning,
seeds) that answer the LoRA paper's open questions with error bars; spec -> grid -> runner -> results ->
report (figures, W0 spectra) and suggest."""
