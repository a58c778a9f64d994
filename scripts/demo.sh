#!/usr/bin/env bash
# The HyperBox demo: start a registry, hyperboxd and a containerd (with
# hyperboxd as its proxy snapshotter) in a temp dir; build a sample image and
# convert it; then start it lazily through hyperbox and fully through
# containerd's overlayfs snapshotter, and print time to output and bytes
# fetched for each.
set -euo pipefail

BIN=${CARGO_TARGET_DIR:-$(pwd)/target}/release
HYPERBOX="$BIN/hyperbox"
HYPERBOXD="$BIN/hyperboxd"
[ -x "$HYPERBOX" ] && [ -x "$HYPERBOXD" ] || { echo "demo: build first (make demo does)"; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "demo: containerd needs root; run as root"; exit 1; }

WORK=$(mktemp -d /tmp/hyperbox-demo.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  # The fd holder hyperboxd started keeps its layers' connections past its
  # exit, on purpose (docs/operations.md, "What a restart does").
  pkill -f "fd-holder --socket $WORK" 2>/dev/null || true
  grep -o " $WORK[^ ]*" /proc/self/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }
# shellcheck source=scripts/lab.sh
. "$(dirname "$0")/lab.sh"

start_registry
step "started docker-registry on $REG; starting hyperboxd and containerd in $WORK"
HBSOCK=$WORK/hyperbox.sock
printf 'version = 1\n' > "$WORK/hyperbox.toml"
"$HYPERBOXD" --root "$WORK/hyperbox" --address "$HBSOCK" --config "$WORK/hyperbox.toml" > "$WORK/hyperboxd.log" 2>&1 &
PIDS+=($!)
start_containerd "$HBSOCK"
CTR=(ctr --address "$SOCK" --namespace demo)
wait_ready

step "building a sample OCI image: busybox plus 64 MiB of application data"
ROOT=$WORK/rootfs
mkdir -p "$ROOT/bin" "$ROOT/etc" "$ROOT/app" "$ROOT/tmp"
cp /bin/busybox "$ROOT/bin/busybox"
for a in sh cat echo ls wc head sha256sum; do ln -s busybox "$ROOT/bin/$a"; done
echo 'root:x:0:0:root:/root:/bin/sh' > "$ROOT/etc/passwd"
echo 'Hello from a HyperBox image!' > "$ROOT/app/greeting.txt"
head -c $((64 << 20)) /dev/urandom > "$ROOT/app/model.bin"
TAR_FLAGS=(--sort=name --mtime=@1700000000 --owner=0 --group=0 --numeric-owner)
GZIP_LEVEL=1 oci_image "$ROOT" '["cat","/app/greeting.txt"]' '["PATH=/bin"]' v1
echo "image oci:$OCI:v1 (layer $(numfmt --to=iec "$LSIZE") gzip)"

step "hyperbox convert oci:$OCI:v1 $REG/demo:hyperbox"
"$HYPERBOX" convert --plain-http "oci:$OCI:v1" "$REG/demo:hyperbox"

step "hyperbox inspect (reads only the index, with one range request per layer)"
"$HYPERBOX" inspect --plain-http "$REG/demo:hyperbox"

step "lazy: hyperbox pull, then ctr run --snapshotter hyperbox"
mark=$(loglines)
start=$(now)
"$HYPERBOX" pull --address "$SOCK" --hyperboxd "$HBSOCK" --namespace lazy "$REG/demo:hyperbox"
ctr --address "$SOCK" --namespace lazy run --rm --snapshotter hyperbox "$REG/demo:hyperbox" lazy1
lazy_time=$(secs "$start" "$(now)")
lazy_bytes=$(served "$mark")
echo "FUSE layer mounts: $(grep -c " - fuse hyperbox:" /proc/self/mountinfo || true)"

step "full pull: ctr image pull, then ctr run (containerd's overlayfs snapshotter)"
mark=$(loglines)
start=$(now)
"${CTR[@]}" image pull --plain-http "$REG/demo:hyperbox" >/dev/null
"${CTR[@]}" run --rm "$REG/demo:hyperbox" full1
full_time=$(secs "$start" "$(now)")
full_bytes=$(served "$mark")

step "the lazy container still reads any file: sha256 of the 64 MiB it never fetched"
ctr --address "$SOCK" --namespace lazy run --rm --snapshotter hyperbox "$REG/demo:hyperbox" lazy2 sha256sum /app/model.bin
sha256sum "$ROOT/app/model.bin"

step "time to output, and bytes fetched from the registry"
printf '%-34s %10s %14s\n' "" "seconds" "bytes fetched"
printf '%-34s %10s %14s\n' "overlayfs (full pull)" "$full_time" "$full_bytes"
printf '%-34s %10s %14s\n' "hyperbox (lazy)" "$lazy_time" "$lazy_bytes"
echo "(loopback: the gap grows with image size and link latency; see docs/benchmarks.md)"
