"""Data: row formats, JSONL reading, generators, tokenizers, samplers and packing."""
