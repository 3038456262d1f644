# Two commands set everything up on a fresh machine:  make demo  /  make test
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEV    := $(VENV)/.installed-dev
MAMBA_SSM := 2.3.2.post1
KERNELS   := $(VENV)/.installed-mamba-ssm-$(MAMBA_SSM)

.PHONY: venv demo test bench lint corpus clean

venv: $(STAMP)

# A Python >= 3.12 is found automatically (PYTHON=..., python3.1x on PATH, pyenv).
# The demo needs the package only; the tests add the dev extra (transformers, plots, ...).
# Both install the exact versions of constraints.txt (setup.py has compatible ranges).
$(STAMP): setup.py constraints.txt
	@set -e; interp=$$(tools/find_python.sh); \
	echo "[make] using $$interp"; \
	test -x $(PY) || $$interp -m venv $(VENV); \
	$(PY) -m pip install -q --upgrade pip; \
	$(PY) -m pip install -q -c constraints.txt -e .; \
	touch $(STAMP)

$(DEV): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $(DEV)

# mamba-ssm's Triton kernels, which tests/kernels runs on CPU under Triton's interpreter: its
# source archive without the CUDA extension (MAMBA_SKIP_CUDA_BUILD; MAMBA_FORCE_BUILD: build
# here instead of downloading a prebuilt CUDA wheel). Its setup.py imports torch, setuptools,
# wheel and packaging from this venv (--no-build-isolation); triton and einops come with torch
# and megatron-core (--no-deps). Runs on CPU keep the torch kernels (models/mamba/adapter).
$(KERNELS): $(DEV)
	$(PY) -m pip install -q -c constraints.txt "setuptools>=61" wheel packaging
	MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE $(PY) -m pip install -q -c constraints.txt \
		--no-build-isolation --no-deps mamba-ssm==$(MAMBA_SSM)
	@touch $(KERNELS)

demo: $(STAMP)
	@bash examples/demo.sh

test: $(KERNELS)
	$(PY) -m pytest -q tests

# Step-time benchmark of the tiny model on 2 CPU ranks -> runs/bench/*.json (see tools/bench_*.py).
bench: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc-per-node 2 tools/bench_rlp_step.py \
		--config examples/configs/tiny_cpu.yaml --steps 10 --warmup 2 \
		--out runs/bench/tiny_cpu_dp2.json

lint: $(DEV)
	$(VENV)/bin/ruff check megatron_rlp tools tests pretrain_rlp.py

# Regenerate the shipped corpus (deterministic).
corpus: $(STAMP)
	$(PY) tools/make_corpus.py --out data/corpus.jsonl

clean:
	rm -rf $(VENV) runs
