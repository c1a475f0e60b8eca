"""Data: tokenizer, corpora and shards, chat and preference formatting."""
