#!/usr/bin/env bash
# Install what building, testing and the demo need on Debian (bookworm).
# Idempotent: apt runs only when a package is missing.
set -euo pipefail

packages=(
  containerd runc fuse3 docker-registry   # the real parts tests and the demo run
  protobuf-compiler                       # containerd-snapshots' build
  clang libclang-dev                      # the rocksdb build
  zstd busybox-static attr libcap2-bin tar coreutils  # test fixtures and the demo image
  python3                                 # the demo image's service, the scripts' helpers and the slow link
  debootstrap                             # the Debian test image and the cold-start benchmark
  systemd                                 # systemd_fdstore_e2e runs hyperboxd.service under a systemd --user
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

# Newer containerd releases for the test matrix (`make test` runs the
# containerd end-to-end tests on the system's 1.6 and on each of these).
# Debian builds them for trixie and sid; they run here next to bookworm's
# 1.6 without installing anything: a private apt state (its own sources
# list, lists and cache) downloads the package and dpkg -x unpacks it. Only
# containerd, its runc shim and ctr are kept; runc stays bookworm's (sid's
# needs a newer glibc). Cached in $HYPERBOX_CONTAINERD_CACHE/containerd-SERIES/bin.
#   suite  upstream series: the suite's build of the newest release in it
#          (trixie has 1.7.24 and sid 2.1.9 as of 2026-12; a suite that
#          moves on within the series is followed, not a failure)
containerd_matrix=(
  "trixie 1.7"
  "sid 2"
)
cache="${HYPERBOX_CONTAINERD_CACHE:-/var/cache/hyperbox}"
mirror="$(grep -rhoE 'https?://[^ ]*debian[^ ]*/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
  | grep -v security | head -n1 | tr -d ' ' || true)"
mirror="${mirror:-http://deb.debian.org/debian}"
apt_dir="$cache/apt"
apt_opts=()
apt_ready=""
for entry in "${containerd_matrix[@]}"; do
  read -r suite version <<<"$entry"
  bin="$cache/containerd-$version/bin"
  if [ -x "$bin/containerd" ] && [ -x "$bin/ctr" ] && [ -x "$bin/containerd-shim-runc-v2" ]; then
    continue
  fi
  if [ -z "$apt_ready" ]; then
    echo "deps: fetching containerd ${containerd_matrix[*]} from Debian ($mirror) into $cache"
    mkdir -p "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial"
    : >"$apt_dir/sources.list"
    for e in "${containerd_matrix[@]}"; do
      read -r s _ <<<"$e"
      echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $s main" >>"$apt_dir/sources.list"
    done
    apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
      -o "Dir::State=$apt_dir/state" -o "Dir::Cache=$apt_dir/cache" -o Dir::State::status=/var/lib/dpkg/status
      -o APT::Sandbox::User=root)
    apt-get "${apt_opts[@]}" update -qq
    apt_ready=1
  fi
  # The suite's build of a release in that series, e.g. 2.1.9+ds1-5.
  deb_version="$(apt-cache "${apt_opts[@]}" madison containerd \
    | awk -F' [|] ' -v s=" $suite/" -v v="$version." '$3 ~ s && index($2, v) == 1 { gsub(/ /, "", $2); print $2; exit }')"
  if [ -z "$deb_version" ]; then
    echo "deps: Debian $suite has no containerd $version.x any more; its containerd versions:" >&2
    apt-cache "${apt_opts[@]}" madison containerd >&2
    echo "deps: update containerd_matrix in scripts/deps.sh" >&2
    exit 1
  fi
  tmp="$(mktemp -d)"
  (cd "$tmp" && apt-get "${apt_opts[@]}" download -qq "containerd=$deb_version" && dpkg-deb -x containerd_*.deb root)
  mkdir -p "$cache/containerd-$version.new/bin"
  for f in containerd containerd-shim-runc-v2 ctr; do
    cp "$tmp/root/usr/bin/$f" "$cache/containerd-$version.new/bin/"
  done
  echo "$deb_version" >"$cache/containerd-$version.new/debian-version"
  rm -rf "$tmp" "$cache/containerd-$version"
  mv "$cache/containerd-$version.new" "$cache/containerd-$version"
  "$cache/containerd-$version/bin/containerd" --version
done
# The package lists (about 60 MB) are needed only to fetch.
[ -z "$apt_ready" ] || rm -rf "$apt_dir"
