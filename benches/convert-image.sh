#!/usr/bin/env bash
# Whole-image convert benchmark: a real Debian bookworm image with python3,
# numpy and scipy (about 950 MB unpacked), built with debootstrap, pushed as
# an ordinary gzip image, then converted by `hyperbox convert` from a local
# docker-registry to the same registry. Prints the converter's summary and
# the wall time; run it a few times and quote the median.
#
#   bash benches/convert-image.sh [RUNS]
#
# The rootfs is cached in $HYPERBOX_BENCH_DIR (default /var/tmp/hb-bench).
set -euo pipefail
RUNS=${1:-3}
DIR=${HYPERBOX_BENCH_DIR:-/var/tmp/hb-bench}
BIN=${CARGO_TARGET_DIR:-$(pwd)/target}/release/hyperbox
[ -x "$BIN" ] || cargo build --release --bin hyperbox
mkdir -p "$DIR"
if [ ! -x "$DIR/rootfs/usr/bin/python3" ]; then
  command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
  debootstrap --variant=minbase --include=python3,python3-numpy,python3-scipy bookworm "$DIR/rootfs" http://deb.debian.org/debian
fi
rm -f "$DIR"/rootfs/var/cache/apt/archives/*.deb

WORK=$(mktemp -d /tmp/hb-convert-bench.XXXXXX)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$WORK"' EXIT
# shellcheck source=scripts/lab.sh
. "$(dirname "$0")/../scripts/lab.sh"
start_registry
wait_registry

# The source image: one gzip layer, as `docker build` would push it.
TAR_FLAGS=(--numeric-owner --xattrs)
oci_image "$DIR/rootfs" '["python3"]' '[]' src
echo "image: $(numfmt --to=iec "$TAR_SIZE") tar, $(numfmt --to=iec "$LSIZE") gzip"

for i in $(seq "$RUNS"); do
  tag="hb$i"
  start=$(date +%s.%N)
  "$BIN" convert -q --plain-http "oci:$OCI:src" "$REG/python:$tag" | tail -2 | head -1
  end=$(date +%s.%N)
  python3 -c "print(f'run $i: {($end-$start):.2f}s wall, {($TAR_SIZE/1e6)/($end-$start):.0f} MB/s of tar')"
done
