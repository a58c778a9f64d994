#!/usr/bin/env bash
# The HyperBox demo. Start a registry, hyperboxd and a containerd (with
# hyperboxd as its proxy snapshotter) in a temp dir; build a sample image (a
# small Python service: this host's python3 and its standard library, plus
# 32 MiB of application data it does not read at start) and convert it; then
# start it three ways over an emulated slow link between the clients
# (containerd, hyperboxd) and the registry:
#
#   full pull  ctr image pull, then ctr run (containerd's overlayfs snapshotter)
#   lazy       hyperbox pull, then ctr run --snapshotter hyperbox: no trace,
#              every chunk fetched when first read
#   traced     the same on a wiped hyperboxd that imported the trace the lazy
#              start recorded (as another node would): it prefetches
#
# For each: the time from the start of the pull to the workload's output
# (checked), and the bytes fetched from the registry; then a table.
#
#   DEMO_LINK=100:20   the link: Mbit/s : one-way delay in ms (the default)
#   DEMO_LINK=none     no emulated link: straight to the registry on loopback
#
# The link is benches/slowlink.py, a user-space proxy (this kernel has no
# netem); benches/cold-start.sh measures the same three starts on a larger
# image.
set -euo pipefail

BIN=${CARGO_TARGET_DIR:-$(pwd)/target}/release
HYPERBOX="$BIN/hyperbox"
if [ ! -x "$HYPERBOX" ] || [ ! -x "$BIN/hyperboxd" ]; then echo "demo: build first (make demo does)"; exit 1; fi
[ "$(id -u)" -eq 0 ] || { echo "demo: containerd needs root; run as root"; exit 1; }
LINK=${DEMO_LINK:-100:20}
if [ "$LINK" != none ]; then
  RATE=${LINK%%:*} DELAY=${LINK#*:}
  num='^[0-9]+([.][0-9]+)?$'
  if [[ $LINK != *:* || ! $RATE =~ $num || ! $DELAY =~ $num ]] || ! awk "BEGIN { exit !($RATE > 0) }"; then
    echo "demo: DEMO_LINK is RATE_MBIT:DELAY_MS (e.g. 100:20) or none, not '$LINK'"; exit 1
  fi
fi
# The service runs the system's python3 (Debian's), not one of a version manager.
PY=$(readlink -f /usr/bin/python3 2>/dev/null || true)
[ -x "$PY" ] || { echo "demo: the image is built from /usr/bin/python3: apt-get install python3"; exit 1; }

WORK=$(mktemp -d /tmp/hyperbox-demo.XXXXXX)
PIDS=(); HBPID=; LINKPID=
cleanup() {
  if [ -n "$HBPID" ]; then kill "$HBPID" 2>/dev/null || true; fi
  if [ -n "$LINKPID" ]; then kill "$LINKPID" 2>/dev/null || true; fi
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  grep -o " ${WORK}[^ ]*" /proc/self/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
fail() { printf '\n\033[1;31mdemo: FAILED: %s\033[0m\n' "$*" >&2; exit 1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
# shellcheck source=scripts/lab.sh
. "$(dirname "$0")/lab.sh"

start_registry
step "started docker-registry on $REG; starting containerd and hyperboxd in $WORK"
HBSOCK=$WORK/hyperbox.sock
HBROOT=$WORK/hyperbox
# idle_secs: the lazy start's trace is kept once it has read nothing new for
# 3 s (10 by default), so the demo waits less. keep_fds off: the demo
# restarts hyperboxd on a wiped root, and a stop unmounts its layers.
cat > "$WORK/hyperbox.toml" <<'TOML'
version = 1
[trace]
idle_secs = 3
[daemon]
keep_fds = "off"
TOML
start_containerd "$HBSOCK"
wait_ready
hb_start
if [ "$LINK" = none ]; then
  VIA=$REG
  LINK_LABEL="loopback, no emulated link"
  OVER="on loopback"
else
  start_slowlink "$RATE" "$DELAY"
  LINK_LABEL="$RATE Mbit/s, $DELAY ms each way (benches/slowlink.py)"
  OVER="over the link"
  echo "emulated link: $VIA -> $REG, $LINK_LABEL"
fi

step "building a sample OCI image: a Python service (python3, its standard library, 32 MiB of data)"
ROOT=$WORK/rootfs
STDLIB=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')
mkdir -p "$ROOT/bin" "$ROOT/usr/bin" "$ROOT/usr/lib" "$ROOT/etc" "$ROOT/app" "$ROOT/tmp"
cp /bin/busybox "$ROOT/bin/busybox"
for a in sh cat ls sha256sum; do ln -s busybox "$ROOT/bin/$a"; done
echo 'root:x:0:0:root:/root:/bin/sh' > "$ROOT/etc/passwd"
cp "$PY" "$ROOT/usr/bin/python3"
# Timestamps kept: the .pyc files are checked against their sources' mtimes.
cp -a "$STDLIB" "$ROOT/usr/lib/"
# Links to the host's files (Debian's sitecustomize.py in /etc, ...) would
# dangle in the image.
find "$ROOT/usr/lib" -type l \( -lname '/*' -o -xtype l \) -delete
# The shared libraries python3 and its extension modules link.
ldd "$PY" "$STDLIB"/lib-dynload/*.so |
  awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// && $2 ~ /^\(/ { print $1 }' | sort -u |
  while read -r lib; do cp -L --parents "$lib" "$ROOT/"; done
cat > "$ROOT/app/main.py" <<'PY'
# The service's start: load what it runs on, then answer.
import argparse, asyncio, csv, dataclasses, datetime, decimal, email.message, hashlib
import http.server, json, logging, sqlite3, ssl, urllib.request, uuid, xml.etree.ElementTree, zipfile

db = sqlite3.connect(":memory:")
db.execute("create table greeting (text)")
db.execute("insert into greeting values ('Hello from a HyperBox image!')")
print(db.execute("select text from greeting").fetchone()[0])
PY
EXPECT='Hello from a HyperBox image!'
head -c $((32 << 20)) /dev/urandom > "$ROOT/app/model.bin"
MODEL_SHA=$(sha256sum "$ROOT/app/model.bin" | cut -d' ' -f1)
TAR_FLAGS=(--sort=name --owner=0 --group=0 --numeric-owner)
GZIP_LEVEL=1 oci_image "$ROOT" '["python3","/app/main.py"]' '["PATH=/usr/bin:/bin"]' v1
echo "image oci:$OCI:v1: $(find "$ROOT" -type f | wc -l) files, $(mib "$TAR_SIZE") tar, $(mib "$LSIZE") gzip"

step "hyperbox convert oci:$OCI:v1 $REG/demo:hyperbox"
"$HYPERBOX" convert --plain-http "oci:$OCI:v1" "$REG/demo:hyperbox"
IMAGE_BYTES=$(hyperbox_layer_bytes "$REG/demo:hyperbox")

step "hyperbox inspect (reads only the index, with one range request per layer)"
"$HYPERBOX" inspect --plain-http "$REG/demo:hyperbox"

# Every start below pulls through the link.
IMG=$VIA/demo:hyperbox

# Start $IMG in containerd namespace $1, fully (ctr image pull, overlayfs)
# or lazily ($2 = lazy: hyperbox pull, --snapshotter hyperbox); check what the
# workload printed. Sets T (seconds to output) and B (bytes fetched).
start_image() {
  local ns=$1 how=$2 mark t0 out
  mark=$(loglines); t0=$(now)
  if [ "$how" = lazy ]; then
    "$HYPERBOX" pull --address "$SOCK" --hyperboxd "$HBSOCK" --namespace "$ns" "$IMG" || fail "hyperbox pull ($ns)"
    out=$(ctr_ -n "$ns" run --rm --snapshotter hyperbox "$IMG" "$ns") || fail "ctr run ($ns): $out"
  else
    ctr_ -n "$ns" image pull --plain-http "$IMG" >/dev/null || fail "ctr image pull ($ns)"
    out=$(ctr_ -n "$ns" run --rm "$IMG" "$ns") || fail "ctr run ($ns): $out"
  fi
  T=$(elapsed "$t0" "$(now)")
  B=$(served "$mark")
  echo "the container printed: $out"
  [ "$out" = "$EXPECT" ] || fail "the $ns start printed '$out', expected '$EXPECT'"
  printf '\033[1m%s: %s s to output, %s fetched from the registry (%s%% of the image)\033[0m\n' \
    "$ns" "$T" "$(mib "$B")" "$(awk -v b="$B" -v i="$IMAGE_BYTES" 'BEGIN { printf "%.1f", 100 * b / i }')"
}

step "1/3 full pull: ctr image pull, then ctr run (containerd's overlayfs snapshotter), $OVER"
start_image full full
full_time=$T full_bytes=$B

step "2/3 lazy: hyperbox pull, then ctr run --snapshotter hyperbox, no trace, $OVER"
start_image lazy lazy
lazy_time=$T lazy_bytes=$B

step "the lazy start's trace: export it, wipe hyperboxd's store, import it (as on another node)"
wait_trace "$HYPERBOX" "$IMG" 1 "$WORK/trace.json" || fail "the lazy start left no trace"
python3 -c "import json; t = json.load(open('$WORK/trace.json')); e = t['entries']
print(f\"trace of {t['image']}: {len(e)} chunks, {sum(c['c_len'] for c in e) / 2**20:.1f} MiB, in the order the start first read them\")"
ctr_ -n lazy image rm --sync "$IMG" >/dev/null || fail "ctr image rm (lazy)"
hb_stop
rm -rf "$HBROOT"
hb_start
"$HYPERBOX" trace --address "$HBSOCK" import "$WORK/trace.json" || fail "hyperbox trace import"

step "3/3 traced: hyperbox pull (prefetches the trace's chunks), then ctr run --snapshotter hyperbox, $OVER"
start_image traced lazy
traced_time=$T traced_bytes=$B

step "a lazy container still reads every file: sha256 of the 32 MiB it never fetched"
t0=$(now)
got=$(ctr_ -n traced run --rm --snapshotter hyperbox "$IMG" check sha256sum /app/model.bin) || fail "ctr run (check): $got"
echo "$got (read in $(elapsed "$t0" "$(now)") s)"
[ "${got%% *}" = "$MODEL_SHA" ] || fail "the container read /app/model.bin as ${got%% *}, the image has $MODEL_SHA"
echo "the same as the image's"

step "time to the workload's output, and bytes fetched from the registry: $LINK_LABEL"
echo "image: $(mib "$IMAGE_BYTES") (one HyperBox layer); every start checked its output"
row() { printf '%-34s %9s s %14s %10s\n' "$1" "$2" "$(mib "$3")" "$(awk -v f="$full_time" -v t="$2" 'BEGIN { printf "%.1fx", f / t }')"; }
printf '%-34s %11s %14s %10s\n' "start" "to output" "fetched" "vs full"
row "overlayfs, full pull" "$full_time" "$full_bytes"
row "hyperbox, lazy (no trace)" "$lazy_time" "$lazy_bytes"
row "hyperbox, traced (wiped store)" "$traced_time" "$traced_bytes"
echo "The full pull grows with the image's size over the link's bandwidth; the lazy"
echo "start with what the workload reads, one round trip per miss; a trace turns"
echo "those misses into one prefetch. docs/benchmarks.md has a ~900 MiB image."
