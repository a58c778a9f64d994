# The two commands of the README: `make demo` and `make test`.
# Both install what they need first (scripts/deps.sh).

CARGO ?= cargo
export CARGO_TARGET_DIR ?= $(CURDIR)/target
# The newer containerd series the containerd tests also run on (1.7: 1.7.24
# from trixie; 2: 2.1.9 from sid, as of 2026-12); deps unpacks them
# (scripts/deps.sh, which names the Debian suite of each).
CONTAINERD_VERSIONS ?= 1.7 2

.PHONY: deps build demo test test-containerd bench fmt clippy deb

deps:
	@bash scripts/deps.sh

build: deps
	$(CARGO) build --release --bins

# Build, start a local registry, hyperboxd and containerd, convert a sample
# image, and start it over an emulated slow link three ways: a full pull on
# containerd's overlayfs, lazily, and lazily with a trace (DEMO_LINK=none:
# no emulated link).
demo: build
	@bash scripts/demo.sh

# Every test: unit, integration (real docker-registry, containerd, runc) and
# the benchmarks once each in test mode. Missing prerequisites fail, not skip.
# Then the containerd end-to-end tests again on each newer containerd
# (scripts/containerd-matrix.sh); the whole suite runs on the system's 1.6.
test: deps
	@echo "=== every test, on the system's containerd: $$(containerd --version)"
	HYPERBOX_REQUIRE_E2E=1 $(CARGO) test --workspace --all-targets
	@CARGO="$(CARGO)" bash scripts/containerd-matrix.sh $(CONTAINERD_VERSIONS)

# The containerd tests on one version: make test-containerd CONTAINERD_VERSIONS=2
test-containerd: deps
	@CARGO="$(CARGO)" bash scripts/containerd-matrix.sh $(CONTAINERD_VERSIONS)

# The Debian package from a release build (cargo-deb, installed by deps):
# $(CARGO_TARGET_DIR)/debian/hyperbox_VERSION_ARCH.deb, stripped, and its
# debug symbols in hyperbox-dbgsym_VERSION_ARCH.ddeb.
deb: deps
	$(CARGO) deb --locked --dbgsym

bench: deps
	$(CARGO) bench --bench format --bench fetch --bench fs

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy --workspace --all-targets
