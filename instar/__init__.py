"""instar: train a language model through a graph of stages from one YAML recipe."""

import os

__version__ = "0.1.0"

# The tokenizers library's batch encoding leaves a rayon thread pool spinning for seconds after it
# returns, which starves torch's OpenMP threads: measured 55 ms -> 2.8 s per training step on 2
# cores. Tokenising is a one-off cost per stage here, so run it on one thread unless asked.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
