"""FP8 tensorwise scaling (amax -> scale -> saturating cast) and the FP8 linear built on it."""
