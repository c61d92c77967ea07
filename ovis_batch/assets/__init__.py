"""Data files shipped with ovis-batch: chat template, tiny-tokenizer corpus, demo sample."""
