# tcpmon — `make run` and `make test` are the two commands a new user needs (as root).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST_ARCH := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/' \
		-e 's/armv.*/arm/' -e 's/riscv64/riscv/')
TARGET_ARCH ?= $(HOST_ARCH)
ARCHES := x86 arm64 arm riscv
BPF_SRC := bpf/tcpconnect.bpf.c bpf/tcpmon.h bpf/kernel_types.h bpf/Makefile
PKG_BPF_OBJ := tcpmon/data/tcpconnect.bpf.o
STAMP := build/stamps
PYTEST_ARGS ?=

.DELETE_ON_ERROR:
.PRECIOUS: $(STAMP)/deps-%
.PHONY: run test build bpf build-all build-cross arch-info lint bench test-kernels dev-setup deps install clean \
	image image-arm64

run: build
	$(VENV)/bin/tcpmon run

test: build $(STAMP)/deps-test
	scripts/lint.sh
	$(PY) -m pytest $(PYTEST_ARGS)

build: $(STAMP)/venv $(PKG_BPF_OBJ)

dev-setup: build

deps: $(STAMP)/deps-run $(STAMP)/deps-test

# Debian packages by group (scripts/apt-packages.txt): run < test < cross.
$(STAMP)/deps-%: scripts/install-deps.sh scripts/apt-packages.txt
	scripts/install-deps.sh $*
	@mkdir -p $(@D) && touch $@

# The venv is rebuilt when a Python dependency, the build or the Cython code changes.
$(STAMP)/venv: $(STAMP)/deps-run setup.py requirements-dev.txt $(wildcard ext/*.pyx ext/*.pxd) bpf/tcpmon.h
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	@mkdir -p $(@D) && touch $@

bpf: $(STAMP)/deps-run
	$(MAKE) -C bpf TARGET_ARCH=$(TARGET_ARCH)

build/bpf/$(HOST_ARCH)/tcpconnect.bpf.o: $(BPF_SRC) $(STAMP)/deps-run
	$(MAKE) -C bpf TARGET_ARCH=$(HOST_ARCH)

$(PKG_BPF_OBJ): build/bpf/$(HOST_ARCH)/tcpconnect.bpf.o
	@mkdir -p $(@D)
	cp $< $@

build-all: $(STAMP)/venv
	for arch in $(ARCHES); do $(MAKE) -C bpf TARGET_ARCH=$$arch || exit 1; done
	scripts/check-bpf-objects.sh $(foreach arch,$(ARCHES),build/bpf/$(arch)/tcpconnect.bpf.o)

clean:
	rm -rf build $(VENV) $(PKG_BPF_OBJ) ext/*.c tcpmon/*.so *.egg-info .pytest_cache

lint: build $(STAMP)/deps-test
	scripts/lint.sh

bench: build $(STAMP)/deps-test
	$(PY) -m pytest benchmarks -p no:cacheprovider --benchmark-enable $(PYTEST_ARGS)

arch-info:
	@scripts/arch-info.sh

build-cross: build $(STAMP)/deps-cross
	scripts/build-cross.sh arm64

test-kernels: build $(STAMP)/deps-test $(STAMP)/deps-cross
	kernels/run-matrix.sh

install: build
	scripts/install.sh

# tcpmon:VERSION and tcpmon:VERSION-debug with podman, offline (scripts/build-image.sh);
# TARGET_ARCH=arm64 (or make image-arm64) builds arm64 ones under qemu-user-static.
image: $(STAMP)/deps-test
	TARGET_ARCH=$(TARGET_ARCH) scripts/build-image.sh

image-arm64: $(STAMP)/deps-test $(STAMP)/deps-cross
	TARGET_ARCH=arm64 scripts/build-image.sh
