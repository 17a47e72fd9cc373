"""Layer 0, the core: read and describe checkpoint trees (errors, dtypes, the key map and the LoRA key grammar,
safetensors I/O, tree reading and layout detection). It imports nothing from the layers above it (the
reference runner, the converter and validator, the CLI), and nothing here imports torch when it is imported."""
