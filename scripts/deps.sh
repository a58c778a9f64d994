#!/usr/bin/env bash
# Install what building, testing and the demo need on Debian (bookworm).
# Idempotent: apt runs only when a package is missing.
set -euo pipefail

packages=(
  containerd runc fuse3 docker-registry   # the real parts tests and the demo run
  protobuf-compiler                       # containerd-snapshots' build
  clang libclang-dev                      # the rocksdb build
  zstd busybox-static attr libcap2-bin tar coreutils  # test fixtures and the demo image
  debootstrap                             # the Debian test image and the cold-start benchmark
  apache2-utils                           # htpasswd, for the registry auth test
  dpkg-dev                                # cargo-deb: dpkg-shlibdeps (Depends), strip (binutils)
  pkg-config ca-certificates curl
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "deps: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's containerd package starts a system containerd; tests run their own.
command -v cargo >/dev/null || { echo "deps: cargo not found; install Rust (rustup) first" >&2; exit 1; }
cargo fetch --locked -q 2>/dev/null || cargo fetch -q

# cargo-deb builds the .deb (`make deb`, tests/deb.rs). Pinned: a new release
# may change the package. Built outside the project's target dir.
cargo_deb_version=3.8.0
if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $cargo_deb_version" ]; then
  echo "deps: installing cargo-deb $cargo_deb_version (about 2 minutes)"
  env -u CARGO_TARGET_DIR cargo install cargo-deb --version "$cargo_deb_version" --locked -q
fi
