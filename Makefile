# The two commands of the README: `make demo` and `make test`.
# Both install what they need first (scripts/deps.sh).

CARGO ?= cargo
export CARGO_TARGET_DIR ?= $(CURDIR)/target

.PHONY: deps build demo test bench fmt clippy deb

deps:
	@bash scripts/deps.sh

build: deps
	$(CARGO) build --release --bins

# Build, start a local registry and containerd, convert a sample image and
# run it on a vanilla containerd.
demo: build
	@bash scripts/demo.sh

# Every test: unit, integration (real docker-registry, containerd, runc) and
# the benchmarks once each in test mode. Missing prerequisites fail, not skip.
test: deps
	HYPERBOX_REQUIRE_E2E=1 $(CARGO) test --workspace --all-targets

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
