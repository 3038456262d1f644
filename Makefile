# Two commands set everything up on a fresh machine:  make demo  /  make test
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEV    := $(VENV)/.installed-dev

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

demo: $(STAMP)
	@bash examples/demo.sh

test: $(DEV)
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
