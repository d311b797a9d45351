# The README's two commands: `make demo` and `make test`. Both create .venv on first use and
# install instar with the CPU torch pinned by constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test golden setup clean system-deps slurm-up slurm-down bench-pipeline bench-zero bench-zero-quick docker-test

setup: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	DS_BUILD_OPS=0 $(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/instar run recipes/tiny/pipeline.yaml

# The tests marked `slurm` run on a real one-node cluster started here (and stopped after, if this
# started it).
test: $(STAMP) system-deps
	scripts/slurm-cluster.sh up
	status=0; $(BIN)/python -m pytest -q tests || status=$$?; scripts/slurm-cluster.sh down --if-started; exit $$status

# Rewrites tests/assets/losses/*.json from the seeded tiny chain (tests/test_golden_losses.py compares
# with them): run it only when a change of the losses is meant, and say why in the commit.
golden: $(STAMP)
	$(BIN)/python -m tests.golden_losses --write

# Debian packages some tests use (Chromium renders `instar report` pages). Installed when this
# runs as root with apt-get (CI, containers); elsewhere those tests skip and say why.
system-deps:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  chromium >/dev/null; } || echo "note: chromium not installed; the report rendering test will skip"

# A one-node Slurm cluster on this host (installed with apt-get when this runs as root; elsewhere
# the slurm tests skip and say why), e.g. to run `pytest -m slurm` by hand.
slurm-up:
	scripts/slurm-cluster.sh up

slurm-down:
	scripts/slurm-cluster.sh down

# Builds docker/Dockerfile.cpu on a Debian image made here with debootstrap and runs the tiny
# pipeline inside it (root: installs docker.io/debootstrap, starts and stops dockerd). Slow, so
# not in `make test`; README "Run in Docker" has its measured time.
docker-test: $(STAMP)
	$(BIN)/python -m pytest -q -s -m docker tests/test_docker.py

clean:
	rm -rf $(VENV) runs

# Times `make demo` in a fresh clone, a cold and a cached `instar run`; writes bench/RESULTS.md.
bench-pipeline: $(STAMP)
	$(BIN)/python bench/pipeline.py --make-demo

# instar's ZeRO-2 pretrain stage on 2 CPU ranks vs a hand-written DeepSpeed loop (target >= 0.95x
# tokens/s), ZeRO-1/2/3 tokens/s and peak RSS per rank, 3 runs each; writes bench/RESULTS.md (~25 min on 2 cores).
bench-zero: $(STAMP)
	$(BIN)/python bench/zero.py

# A few steps of each, once; prints the table and leaves bench/RESULTS.md alone (~7 min).
bench-zero-quick: $(STAMP)
	$(BIN)/python bench/zero.py --quick --repeats 1

# instar side by side with a plain PyTorch loop, HF Trainer, TRL's SFT/DPO/GRPO trainers and a
# hand-written DeepSpeed ZeRO-2 loop on the same model, data and batch: a table of ratios, then the
# full ZeRO-1/2/3 comparison; both write their sections of bench/RESULTS.md (3 runs each).
.PHONY: bench bench-quick
bench: $(STAMP) bench-data
	$(BIN)/python bench/peers.py
	$(BIN)/python bench/zero.py

# Pretraining data loading in one process: memmap token shards (`instar data tokenize`) vs JSONL,
# real tokens/s of packed batches (target >= 20 M); writes its bench/RESULTS.md section (~3 min).
.PHONY: bench-data
bench-data: $(STAMP)
	$(BIN)/python bench/data_loading.py

# Every contender once, a few steps; prints the table and leaves bench/RESULTS.md alone.
bench-quick: $(STAMP)
	$(BIN)/python bench/peers.py --quick
	$(BIN)/python bench/data_loading.py --quick
