"""Weight-space operations on models that share a base."""
