"""Export side of the HF Eagle 2.5 layout: ``config.json`` / ``preprocessor_config.json`` writers,
the self-contained directory writer, and the transformers remote-code modules copied into it."""
