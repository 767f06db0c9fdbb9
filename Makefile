# xentap — the two commands a new user runs are `make demo` and `make test`.
# Both set up everything they need first (Debian packages, .venv, the build).

PY      := .venv/bin/python
PYTEST  := .venv/bin/python -m pytest
SHIM_SO := $(wildcard xentap/_shim_c*.so)
FFI_SRC := $(wildcard ffi/*.c ffi/*.h ffi/*.py)

.PHONY: all setup build demo test test-fast test-slow xen-test bench clean

all: build

setup:
	@tools/setup.sh

# Rebuild the cffi extension in place when a C source changes.
build: setup .build-stamp
.build-stamp: $(FFI_SRC) setup.py
	@$(PY) setup.py -q build_ext --inplace 2>&1 | grep -v -E '^(running|copying|creating)' || true
	@test -n "$$(ls xentap/_shim_c*.so 2>/dev/null)" || { echo "build: the shim extension did not build" >&2; exit 1; }
	@touch $@

demo: build
	.venv/bin/xentap demo

test: build
	$(PYTEST) -q -m "not slow and not xen" tests
	$(PYTEST) -q -m "slow" tests; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]
	$(MAKE) --no-print-directory xen-test
	$(MAKE) --no-print-directory asan-test
	$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=60

test-fast: build
	$(PYTEST) -q -m "not slow and not xen" tests

# The Xen-in-QEMU end-to-end suite (tests/xen/).
xen-test: build appliance-image
	@if [ -x tests/xen/run.sh ]; then tests/xen/run.sh $(CASES); else echo "xen-test: no suite yet"; fi

# The hostile-guest half of the shim's checks: the shim test suites under
# ASan+UBSan (tools/asan.sh), and libFuzzer on the request path
# (tools/fuzz.sh; ends with "fuzz: R requests, E executions, C crashes in S s").
.PHONY: asan-test fuzz fuzz-build
FUZZ_SECONDS ?= 60

asan-test: build
	@tools/asan.sh test

fuzz-build: setup
	@tools/fuzz.sh build

fuzz: setup
	@tools/fuzz.sh run $(FUZZ_SECONDS)

bench: build
	.venv/bin/xentap bench datapath

# The appliance as a PV domain: out/appliance/{vmlinuz,appliance.cpio.gz}
# (appliance_domu/image/build.sh; prints the image's size).
.PHONY: appliance-image
appliance-image: build
	@appliance_domu/image/build.sh

clean:
	rm -rf build .build-stamp xentap/_shim_c*.so xentap/_shim_c.c xentap/_shim_c.o
