"""The training loop, engines, checkpoints and stage kinds."""
