"""Files on disk: atomic writes, PEFT's adapter format, saving and loading adapters, exporting them for other servers."""
