"""Collage AdamW step: reference.py (the spec) and triton.py (one fused pass per element)."""
