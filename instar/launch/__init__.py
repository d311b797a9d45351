"""Launching: environment detection (more executors come with the torchrun and Slurm work)."""
