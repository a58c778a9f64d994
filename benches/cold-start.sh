#!/usr/bin/env bash
# Cold-start benchmark: time from "start this image" to the workload's
# output, on emulated slow links, for
#   overlayfs  containerd's own pull (the ordinary gzip image) and run
#   lazy       hyperbox pull + ctr run --snapshotter hyperbox, no trace
#   traced     the same with the trace of an earlier start (the store
#              wiped, the trace exported and imported back: another node)
# Every run starts cold: images removed, hyperboxd's store wiped, page cache
# dropped. The image is Debian bookworm with python3, numpy and scipy
# (debootstrap, cached in $HYPERBOX_BENCH_DIR, default /var/tmp/hb-bench);
# the workload imports numpy and prints a determinant.
#
#   bash benches/cold-start.sh [RUNS]        (default 3)
#   PROFILES="100:20 1000:2"                 link Mbit/s : one-way delay ms
#   MODES="overlayfs lazy traced"            also: lazy-ra128, the lazy start
#                                            with the kernel's 128 KiB
#                                            read-ahead (docs/tuning.md)
#   OUT=docs/cold-start                      writes OUT.csv and OUT.svg
#   ALT_BIN=DIR                              another build's hyperbox and
#                                            hyperboxd, for modes lazy@alt and
#                                            traced@alt: before/after figures
#                                            side by side in one run
#
# The link is benches/slowlink.py, a user-space proxy between the clients
# and the registry (this kernel has no netem). Needs root, containerd, runc,
# docker-registry; `make deps` installs them.
set -euo pipefail
RUNS=${1:-3}
PROFILES=${PROFILES:-"100:20 1000:2"}
MODES=${MODES:-"overlayfs lazy traced"}
DIR=${HYPERBOX_BENCH_DIR:-/var/tmp/hb-bench}
OUT=${OUT:-docs/cold-start}
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${CARGO_TARGET_DIR:-$HERE/../target}/release
[ -x "$BIN/hyperbox" ] && [ -x "$BIN/hyperboxd" ] || cargo build --release --bins
[ "$(id -u)" -eq 0 ] || { echo "cold-start: needs root (containerd, FUSE)"; exit 1; }

mkdir -p "$DIR"
if [ ! -x "$DIR/rootfs/usr/bin/python3" ]; then
  command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
  debootstrap --variant=minbase --include=python3,python3-numpy,python3-scipy bookworm "$DIR/rootfs" http://deb.debian.org/debian
fi
rm -f "$DIR"/rootfs/var/cache/apt/archives/*.deb

WORK=$(mktemp -d /tmp/hb-cold.XXXXXX)
PIDS=(); HBPID=; LINKPID=
cleanup() {
  [ -n "$HBPID" ] && kill "$HBPID" 2>/dev/null
  [ -n "$LINKPID" ] && kill "$LINKPID" 2>/dev/null
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  grep -o " $WORK[^ ]*" /proc/self/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
now() { date +%s.%N; }
# shellcheck source=scripts/lab.sh
. "$HERE/../scripts/lab.sh"

# ---- registry, containerd ----
start_registry
HBSOCK=$WORK/hyperbox.sock
HBROOT=$WORK/hyperbox
# Each start begins on a wiped root: nothing is kept across the restarts
# between starts (keep_fds = "off": a stop unmounts the layers).
printf 'version = 1\n[trace]\nidle_secs = 3\n[daemon]\nkeep_fds = "off"\n' > "$WORK/hyperbox.toml"
printf 'version = 1\n[trace]\nidle_secs = 3\n[daemon]\nkeep_fds = "off"\nfuse_read_ahead_kb = 128\n' > "$WORK/hyperbox-ra128.toml"
start_containerd "$HBSOCK"
ctr_() { ctr --address "$SOCK" "$@"; }
wait_ready

HBD_BIN=$BIN   # whose hyperboxd hb_start runs
hb_start() {
  "$HBD_BIN/hyperboxd" --root "$HBROOT" --address "$HBSOCK" --config "${1:-$WORK/hyperbox.toml}" >> "$WORK/hyperboxd.log" 2>&1 &
  HBPID=$!
  until [ -S "$HBSOCK" ]; do sleep 0.05; done
  # containerd redials a restarted proxy with backoff: wait until it answers.
  local n=0
  until ctr_ -n probe snapshot --snapshotter hyperbox prepare "probe-$n" >/dev/null 2>&1; do n=$((n + 1)); sleep 0.2; done
  ctr_ -n probe snapshot --snapshotter hyperbox rm "probe-$n" >/dev/null
}
hb_stop() { kill "$HBPID"; wait "$HBPID" || true; HBPID=; }
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# ---- the image: the ordinary gzip one, and its HyperBox conversion ----
TAR_FLAGS=(--numeric-owner --xattrs)
oci_image "$DIR/rootfs" '["python3","-c","import numpy; print(round(numpy.linalg.det(numpy.eye(4) * 2)))"]' \
  '["PATH=/usr/bin:/bin"]' src
# The ordinary image, pushed as it is (distribution's two-step upload).
push_blob() {
  local loc sep
  loc=$(curl -sSf -X POST -D - -o /dev/null "http://$REG/v2/python/blobs/uploads/" | tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
  case $loc in http*) ;; *) loc="http://$REG$loc" ;; esac
  case $loc in *\?*) sep='&' ;; *) sep='?' ;; esac
  curl -sSf -X PUT -H 'Content-Type: application/octet-stream' -T "$OCI/blobs/sha256/$1" "$loc${sep}digest=sha256:$1" >/dev/null
}
push_blob "$LAYER"; push_blob "$CONFIG"
curl -sSf -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' -T "$OCI/blobs/sha256/$MANIFEST" \
  "http://$REG/v2/python/manifests/gzip" >/dev/null
"$BIN/hyperbox" convert -q --plain-http "oci:$OCI:src" "$REG/python:hyperbox" | tail -1
HB_BYTES=$("$BIN/hyperbox" inspect --plain-http --json "$REG/python:hyperbox" | python3 -c 'import json,sys; print(sum(r["blob_size"] for r in json.load(sys.stdin)))')
echo "image: $(numfmt --to=iec "$TAR_SIZE") tar; gzip layer $(numfmt --to=iec "$LSIZE"); HyperBox layer $(numfmt --to=iec "$HB_BYTES")"
EXPECT="16"

# ---- runs ----
echo "profile,mode,run,seconds,bytes,precision,recall" > "$WORK/results.csv"
hb_start
for prof in $PROFILES; do
  rate=${prof%%:*}; delay=${prof##*:}
  LPORT=$(free_port)
  python3 "$HERE/slowlink.py" "$LPORT" "$REG" "$rate" "$delay" > "$WORK/slowlink.log" 2>&1 & LINKPID=$!
  until curl -fsS "http://127.0.0.1:$LPORT/v2/" >/dev/null 2>&1; do sleep 0.1; done
  VIA=127.0.0.1:$LPORT
  label="${rate} Mbit/s, ${delay} ms"
  for i in $(seq "$RUNS"); do
    for mode in $MODES; do
      # MODE@alt: the same start with ALT_BIN's binaries.
      base=${mode%@alt}; B=$BIN
      if [ "$base" != "$mode" ]; then B=${ALT_BIN:?"$mode needs ALT_BIN"}; fi
      ns="b-${mode/@/-}"
      # Every image of the namespace (a previous link's proxy had another port).
      ctr_ -n "$ns" image ls -q | xargs -r ctr --address "$SOCK" -n "$ns" image rm --sync >/dev/null 2>&1 || true
      if [ "$base" != overlayfs ]; then
        hb_stop; rm -rf "$HBROOT"; HBD_BIN=$B
        if [ "$base" = lazy-ra128 ]; then hb_start "$WORK/hyperbox-ra128.toml"; else hb_start; fi
        [ "$base" = traced ] && "$B/hyperbox" trace --address "$HBSOCK" import "$WORK/trace.json" >/dev/null
      fi
      cold
      mark=$(loglines); t0=$(now)
      if [ "$base" = overlayfs ]; then
        ctr_ -n "$ns" image pull --plain-http "$VIA/python:gzip" >/dev/null
        out=$(ctr_ -n "$ns" run --rm "$VIA/python:gzip" "c$i")
      else
        HYPERBOX_ADDRESS="$HBSOCK" "$B/hyperbox" pull --plain-http --address "$SOCK" --namespace "$ns" "$VIA/python:hyperbox" >/dev/null 2>&1
        out=$(ctr_ -n "$ns" run --rm --snapshotter hyperbox "$VIA/python:hyperbox" "c$i")
      fi
      t1=$(now)
      bytes=$(served "$mark")
      [ "$out" = "$EXPECT" ] || { echo "cold-start: $mode printed '$out', expected '$EXPECT'"; exit 1; }
      p=; r=
      if [ "$base" != overlayfs ]; then
        # Let the start's trace be recorded (idle_secs), then keep it.
        until "$B/hyperbox" trace --address "$HBSOCK" export "$VIA/python:hyperbox" "$WORK/t.json" >/dev/null 2>&1 &&
              python3 -c "import json,sys; t=json.load(open('$WORK/t.json')); sys.exit(0 if t['runs'] >= (2 if '$base' == 'traced' else 1) else 1)"; do
          sleep 0.5
        done
        # Traced starts (both builds) import this build's latest lazy trace.
        if [ "$mode" = lazy ]; then cp "$WORK/t.json" "$WORK/trace.json"; fi
        if [ "$base" = traced ]; then
          read -r p r < <(python3 -c "import json; s=json.load(open('$WORK/t.json'))['last_start']; print(s['precision'], s['recall'])")
        fi
      fi
      secs=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
      echo "\"$label\",$mode,$i,$secs,$bytes,$p,$r" >> "$WORK/results.csv"
      printf '%-18s %-10s run %d: %6ss, %s fetched%s\n' "$label" "$mode" "$i" "$secs" "$(numfmt --to=iec "$bytes")" \
        "${p:+, precision $p recall $r}"
    done
  done
  kill "$LINKPID"; wait "$LINKPID" 2>/dev/null || true; LINKPID=
done

mkdir -p "$(dirname "$OUT")"
cp "$WORK/results.csv" "$OUT.csv"
python3 "$HERE/cold-start-report.py" "$OUT.csv" "$OUT.svg"
