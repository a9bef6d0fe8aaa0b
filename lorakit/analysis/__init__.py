"""What an update learned: the LoRA paper's section-7 measures, reports and figures."""
