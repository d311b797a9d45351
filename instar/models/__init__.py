"""Building and loading HF causal LMs, and writing stage artifacts."""
