#!/usr/bin/env bash
# Cold-start benchmark: time from "start this image" to the workload's
# output, on emulated slow links, for
#   overlayfs  containerd's own pull (the ordinary gzip image) and run
#   lazy       hyperbox pull + ctr run --snapshotter hyperbox, no trace
#   traced     the same with the trace of an earlier start (the store
#              wiped, the trace exported and imported back: another node)
# Every run starts cold: images removed, hyperboxd's store wiped, page cache
# dropped. The images are Debian bookworm, built from Debian packages by
# debootstrap and cached in $HYPERBOX_BENCH_DIR (default /var/tmp/hb-bench):
#   python   python3, numpy, scipy, pandas   import pandas and numpy
#   java     openjdk-17-jre-headless         java -version
#   gcc      gcc, libc6-dev                  compile and run hello.c
#   busybox  busybox-static alone            echo (the control)
#   scan     the python image                read every file (find | cat):
#                                            the whole-image read
#   layered  the python image in 4 layers    as python (layers pulled in
#                                            parallel: not in the default
#                                            IMAGES)
#
#   bash benches/cold-start.sh [RUNS]        (default 3)
#   IMAGES="python java gcc busybox scan"
#   PROFILES="100:20 1000:2"                 link Mbit/s : one-way delay ms
#   MODES="overlayfs lazy traced"            also: lazy-ra128, the lazy start
#                                            with the kernel's 128 KiB
#                                            read-ahead (docs/tuning.md);
#                                            pulled and hydrated, the floors:
#                                            only the run is timed, its image
#                                            already pulled into overlayfs
#                                            (pulled) or every chunk already
#                                            in hyperboxd's store (hydrated),
#                                            page cache dropped;
#                                            unconverted, the ordinary gzip
#                                            image through --snapshotter
#                                            hyperbox (unpacked, not lazy)
#   MEMORY=1                                 then hyperboxd's memory: idle,
#                                            with python, java and gcc
#                                            started, and while hydrating them;
#                                            its parts (hyperbox_memory_bytes)
#                                            at the peak of that and of each
#                                            whole-image read go to OUT.md
#   OUT=docs/cold-start                      writes OUT.csv, OUT.svg, OUT.md
#   ALT_BIN=DIR                              another build's hyperbox and
#                                            hyperboxd, for modes lazy@alt and
#                                            traced@alt: before/after figures
#                                            side by side in one run
#   HB_CONFIG=FILE                           extra lines for hyperboxd's config
#   TRACES=DIR                               keep each image's lazy trace there
#   PERF=DIR                                 hyperboxd's profile of each
#                                            HyperBox start there (perf
#                                            record -g; perf report -i FILE)
#   VARIANTS=DIR                             modes MODE+NAME: MODE with
#                                            DIR/NAME.toml added to the config
#                                            (a heuristic on and off, side by
#                                            side in one run)
#
# Each start's line also gives its range requests by priority, the seconds
# its reads waited on the registry, how long a traced prefetch took, and the
# CPU seconds hyperboxd, the link and the registry spent (all three share
# this machine's cores with the workload).
#
# The link is benches/slowlink.py, a user-space proxy between the clients
# and the registry (this kernel has no netem). Needs root, containerd, runc,
# docker-registry, debootstrap; `make deps` installs them.
set -euo pipefail
RUNS=${1:-3}
IMAGES=${IMAGES:-"python java gcc busybox scan"}
PROFILES=${PROFILES:-"100:20 1000:2"}
MODES=${MODES:-"overlayfs lazy traced"}
MEMORY=${MEMORY:-1}
DIR=${HYPERBOX_BENCH_DIR:-/var/tmp/hb-bench}
OUT=${OUT:-docs/cold-start}
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${CARGO_TARGET_DIR:-$HERE/../target}/release
# Always: a stale build would be measured as this one (a no-op when fresh).
cargo build --release --bins
[ "$(id -u)" -eq 0 ] || { echo "cold-start: needs root (containerd, FUSE)"; exit 1; }

# ---- the images: packages, command, and what the command prints ----
# image NAME: sets PKGS (debootstrap's --include), CMD (the config's Cmd,
# JSON), RUN (a command line given to ctr run instead, if any), EXPECT (a
# regex the output must match) and REPO (the repository it is pushed as).
image() {
  REPO=$1; RUN=(); ROOTFS=$1; SPLIT=()
  case $1 in
    python)
      PKGS=python3,python3-numpy,python3-scipy,python3-pandas
      CMD='["python3","-c","import pandas, numpy; print(round(numpy.linalg.det(numpy.eye(4) * 2)))"]'
      EXPECT='^16$' ;;
    java)
      PKGS=openjdk-17-jre-headless
      CMD='["/bin/sh","-c","java -version 2>&1 | head -n 1"]'
      EXPECT='^openjdk version "17' ;;
    gcc)
      PKGS=gcc,libc6-dev
      CMD='["/bin/sh","-c","printf \"#include <stdio.h>\\nint main(void) { puts(\\\"hello\\\"); return 0; }\\n\" > /tmp/h.c && gcc -O2 -o /tmp/h /tmp/h.c && /tmp/h"]'
      EXPECT='^hello$' ;;
    busybox)
      PKGS=
      CMD='["/bin/busybox","echo","hello"]'
      EXPECT='^hello$' ;;
    scan)
      image python; REPO=python
      RUN=(/bin/sh -c 'find / -xdev -type f -exec cat {} + > /dev/null && echo read')
      EXPECT='^read$' ;;
    layered)
      # The python image in four layers: the system, then the Python
      # packages, the shared libraries and /usr/share on top.
      image python; REPO=layered
      SPLIT=(usr/lib/python3 usr/lib/x86_64-linux-gnu usr/share) ;;
    *) echo "cold-start: no image '$1'" >&2; exit 1 ;;
  esac
}

# The root filesystem of image $1 in $DIR/$1/rootfs, built once.
build_rootfs() {
  local root=$DIR/$1/rootfs
  [ -e "$root/.built" ] && return
  rm -rf "$root"; mkdir -p "$root"
  if [ "$1" = busybox ]; then
    (cd "$DIR/$1" && apt-get download -qq busybox-static && dpkg -x busybox-static_*.deb "$root" && rm -f busybox-static_*.deb)
  else
    command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
    debootstrap --variant=minbase --include="$PKGS" bookworm "$root" http://deb.debian.org/debian
    rm -f "$root"/var/cache/apt/archives/*.deb
  fi
  touch "$root/.built"
}

WORK=$(mktemp -d /tmp/hb-cold.XXXXXX)
PIDS=(); HBPID=; LINKPID=
cleanup() {
  if [ -n "$HBPID" ]; then kill "$HBPID" 2>/dev/null || true; fi
  if [ -n "$LINKPID" ]; then kill "$LINKPID" 2>/dev/null || true; fi
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  grep -o " ${WORK}[^ ]*" /proc/self/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
# shellcheck source=scripts/lab.sh
. "$HERE/../scripts/lab.sh"

# ---- registry, containerd ----
start_registry
HBSOCK=$WORK/hyperbox.sock
HBROOT=$WORK/hyperbox
# Each start begins on a wiped root: nothing is kept across the restarts
# between starts (keep_fds = "off": a stop unmounts the layers).
METRICS=127.0.0.1:$(free_port)
conf() {
  printf 'version = 1\n[trace]\nidle_secs = 3\n[daemon]\nkeep_fds = "off"\nmetrics_address = "%s"\n%s\n' "$METRICS" "$1"
  [ -z "${HB_CONFIG:-}" ] || cat "$HB_CONFIG"
}
conf "" > "$WORK/hyperbox.toml"
conf "fuse_read_ahead_kb = 128" > "$WORK/hyperbox-ra128.toml"
start_containerd "$HBSOCK"
wait_ready

HBD_BIN=$BIN   # whose hyperboxd hb_start (scripts/lab.sh) runs
# hyperboxd's peak and current resident memory, MiB.
hb_mem() { awk '/^VmHWM|^VmRSS/ { printf "%d ", $2 / 1024 } END { print "" }' "/proc/$HBPID/status"; }
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
# Where hyperboxd's memory is (hyperbox_memory_bytes, MiB by part), sampled
# every 0.2 s between parts_start and parts_stop: parts_stop prints the
# sample with the largest resident set.
parts() {
  curl -sf "http://$METRICS/metrics" |
    awk -F'"' '/^hyperbox_memory_bytes\{/ { split($3, v, " "); printf "%s %d  ", $2, v[2] / 1048576 }'
}
parts_start() {
  : > "$WORK/parts"
  ( best=-1; while :; do
      t=$(parts || true); r=$(awk '{ print $2 }' <<< "$t")
      if [ -n "$r" ] && [ "$r" -gt "$best" ]; then best=$r; echo "$t" > "$WORK/parts"; fi
      sleep 0.2
    done ) & PARTSPID=$!
  PIDS+=("$PARTSPID")
}
parts_stop() { kill "$PARTSPID" 2>/dev/null || true; wait "$PARTSPID" 2>/dev/null || true; cat "$WORK/parts"; }
# CPU seconds the link and the registry have used so far (both serve every
# mode: the difference across a start is its share).
REGPID=$(pgrep -f "docker-registry serve $WORK/" | head -1)
served_cpu() { cat "/proc/$LINKPID/stat" "/proc/$REGPID/stat" | awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f ", ($14 + $15) / hz }'; }
# The start's range requests by priority and the seconds reads waited on
# the registry (hyperboxd's counters; each start has a fresh hyperboxd),
# read once its trace is saved.
# Wait until every mounted layer is wholly in the store (hyperbox layers).
wait_hydrated() {
  local _
  for _ in $(seq 1200); do
    "$1" layers --address "$HBSOCK" | awk 'NR > 1 && /^sha256:/ { n++; if ($NF != "100.0%") short = 1 }
      END { exit !(n > 0 && !short) }' && return
    sleep 0.5
  done
  echo "cold-start: hydrating $REPO did not finish in 10 minutes"; exit 1
}
fetches() {
  curl -sf "http://$METRICS/metrics" | awk '
    /^hyperbox_fetch_requests_total\{priority="demand"\}/ { d = $2 }
    /^hyperbox_fetch_requests_total\{priority="prefetch"\}/ { p = $2 }
    /^hyperbox_fetch_wait_seconds_total / { w = $2 }
    END { printf "requests %d demand %d prefetch, reads waited %.2f s", d, p, w }'
  # FUSE operations served during the start: count and seconds, by operation
  curl -sf "http://$METRICS/metrics" | awk '
    /^hyperbox_fuse_op_seconds_count\{/ { split($1, k, "\""); n[k[2]] = $2 }
    /^hyperbox_fuse_op_seconds_sum\{/ { split($1, k, "\""); s[k[2]] = $2 }
    END { printf ", FUSE"; for (o in n) if (n[o] > 0) printf " %s %d (%.2f s)", o, n[o], s[o] }'
  # utime + stime, in clock ticks
  awk -v hz="$(getconf CLK_TCK)" '{ printf ", hyperboxd CPU %.2f s", ($14 + $15) / hz }' "/proc/$HBPID/stat"
}

# ---- the images: the ordinary gzip one, and its HyperBox conversion ----
# Sorted by name, as image builders write layers (BuildKit, Docker).
TAR_FLAGS=(--numeric-owner --xattrs --sort=name)
push_blob() { # REPO DIGEST: distribution's two-step upload
  local loc sep
  loc=$(curl -sSf -X POST -D - -o /dev/null "http://$REG/v2/$1/blobs/uploads/" | tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
  case $loc in http*) ;; *) loc="http://$REG$loc" ;; esac
  case $loc in *\?*) sep='&' ;; *) sep='?' ;; esac
  curl -sSf -X PUT -H 'Content-Type: application/octet-stream' -T "$OCI/blobs/sha256/$2" "$loc${sep}digest=sha256:$2" >/dev/null
}
declare -A BUILT
# The memory phase starts python, java and gcc, whatever IMAGES says.
MEMORY_IMAGES=; [ "$MEMORY" = 1 ] && MEMORY_IMAGES="python java gcc"
for img in $IMAGES $MEMORY_IMAGES; do
  image "$img"
  [ -n "${BUILT[$REPO]:-}" ] && continue
  BUILT[$REPO]=1
  build_rootfs "$ROOTFS"
  oci_image "$DIR/$ROOTFS/rootfs" "$CMD" '["PATH=/usr/local/bin:/usr/bin:/bin"]' src "${SPLIT[@]}"
  for l in "${LAYERS[@]}"; do push_blob "$REPO" "$l"; done
  push_blob "$REPO" "$CONFIG"
  curl -sSf -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' -T "$OCI/blobs/sha256/$MANIFEST" \
    "http://$REG/v2/$REPO/manifests/gzip" >/dev/null
  "$BIN/hyperbox" convert -q --plain-http "oci:$OCI:src" "$REG/$REPO:hyperbox" | tail -1
  HB_BYTES=$(hyperbox_layer_bytes "$REG/$REPO:hyperbox")
  echo "$REPO: $(numfmt --to=iec "$TAR_SIZE") tar; gzip ${#LAYERS[@]} layer(s) $(numfmt --to=iec "$LSIZE"); HyperBox $(numfmt --to=iec "$HB_BYTES")"
  rm -rf "$OCI"
done

# ---- runs ----
echo "image,profile,mode,run,seconds,bytes,precision,recall,rss_peak_mb" > "$WORK/results.csv"
hb_start
for prof in $PROFILES; do
  rate=${prof%%:*}; delay=${prof##*:}
  start_slowlink "$rate" "$delay"
  label="${rate} Mbit/s, ${delay} ms"
  for i in $(seq "$RUNS"); do
    for img in $IMAGES; do
      image "$img"
      for mode in $MODES; do
        # MODE@alt: the same start with ALT_BIN's binaries.
        # MODE+NAME: the same start with $VARIANTS/NAME.toml added to the config.
        base=${mode%@alt}; B=$BIN; variant=
        if [ "$base" != "$mode" ]; then B=${ALT_BIN:?"$mode needs ALT_BIN"}; fi
        case $base in *+*) variant=${base#*+}; base=${base%%+*} ;; esac
        # The whole-image read has nothing to trace ahead of it.
        [ "$img" = scan ] && [ "$base" = traced ] && continue
        ns="b-${mode//[@+]/-}"
        # Every image of every mode's namespace (a previous link's proxy had
        # another port): containerd shares blobs between namespaces, so the
        # gzip blob another mode pulled would make this pull fetch nothing.
        for n in $(ctr_ namespaces ls -q | grep '^b-'); do
          ctr_ -n "$n" image ls -q | xargs -r ctr --address "$SOCK" -n "$n" image rm --sync >/dev/null 2>&1 || true
        done
        # Modes that start through containerd's own snapshotter.
        plain=; case $base in overlayfs|pulled) plain=1 ;; esac
        if [ -z "$plain" ]; then
          hb_stop; rm -rf "$HBROOT"; HBD_BIN=$B
          if [ -n "$variant" ]; then
            cat "$WORK/hyperbox.toml" "${VARIANTS:?"$mode needs VARIANTS"}/$variant.toml" > "$WORK/hyperbox-$variant.toml"
            hb_start "$WORK/hyperbox-$variant.toml"
          elif [ "$base" = lazy-ra128 ]; then hb_start "$WORK/hyperbox-ra128.toml"; else hb_start; fi
          [ "$base" = traced ] && "$B/hyperbox" trace --address "$HBSOCK" import "$WORK/trace-$img.json" >/dev/null
        fi
        # The floors: the image is local before the clock starts.
        if [ "$base" = pulled ]; then
          ctr_ -n "$ns" image pull --plain-http "$VIA/$REPO:gzip" >/dev/null
        elif [ "$base" = hydrated ]; then
          HYPERBOX_ADDRESS="$HBSOCK" "$B/hyperbox" pull --hydrate --plain-http --address "$SOCK" --namespace "$ns" "$VIA/$REPO:hyperbox" >/dev/null 2>&1
          wait_hydrated "$B/hyperbox"
        fi
        cold
        # Where the memory of a whole-image read is, at its peak.
        sample=; [ "$img" = scan ] && [ -z "$plain" ] && sample=1
        [ -z "$sample" ] || parts_start
        mark=$(loglines); c0=$(served_cpu); pulled_at=
        # PERF=DIR: hyperboxd's profile of each start (perf record -g).
        perfpid=
        if [ -n "${PERF:-}" ] && [ -z "$plain" ]; then
          mkdir -p "$PERF"
          perf record -q -g -F 1999 -p "$HBPID" -o "$PERF/$img-$rate-$mode-$i.data" 2>/dev/null & perfpid=$!
          sleep 0.5
        fi
        t0=$(now)
        if [ "$base" = overlayfs ] || [ "$base" = pulled ]; then
          [ "$base" = pulled ] || ctr_ -n "$ns" image pull --plain-http "$VIA/$REPO:gzip" >/dev/null
          out=$(ctr_ -n "$ns" run --rm "$VIA/$REPO:gzip" "c$i-$$" "${RUN[@]}")
        elif [ "$base" = unconverted ]; then
          ctr_ -n "$ns" image pull --snapshotter hyperbox --plain-http "$VIA/$REPO:gzip" >/dev/null
          out=$(ctr_ -n "$ns" run --rm --snapshotter hyperbox "$VIA/$REPO:gzip" "c$i-$$" "${RUN[@]}")
        else
          if [ "$base" != hydrated ]; then
            HYPERBOX_ADDRESS="$HBSOCK" "$B/hyperbox" pull --plain-http --address "$SOCK" --namespace "$ns" "$VIA/$REPO:hyperbox" >/dev/null 2>&1
            pulled_at=$(now)
          fi
          out=$(ctr_ -n "$ns" run --rm --snapshotter hyperbox "$VIA/$REPO:hyperbox" "c$i-$$" "${RUN[@]}")
        fi
        t1=$(now); c1=$(served_cpu)
        [ -z "$perfpid" ] || { kill -INT "$perfpid"; wait "$perfpid" || true; }
        [ -z "$sample" ] || echo "$img, $label, $mode, run $i: at the peak (MiB) $(parts_stop)" >> "$WORK/parts.log"
        bytes=$(served "$mark")
        if [ "$base" = overlayfs ] || [ "$base" = unconverted ]; then
          [ "$bytes" -gt 0 ] || { echo "cold-start: $img $mode fetched nothing: not a cold start"; exit 1; }
        fi
        [[ $out =~ $EXPECT ]] || { echo "cold-start: $img $mode printed '$out', expected /$EXPECT/"; exit 1; }
        p=; r=; mem=; f=
        if [ "$base" = unconverted ]; then
          read -r mem _ < <(hb_mem)
        elif [ -z "$plain" ]; then
          read -r mem _ < <(hb_mem)
          # Let the start's trace be recorded (idle_secs), then keep it.
          want=1; if [ "$base" = traced ]; then want=2; fi
          wait_trace "$B/hyperbox" "$VIA/$REPO:hyperbox" "$want" "$WORK/t.json"
          # Traced starts (both builds) import this build's latest lazy trace.
          if [ "$mode" = lazy ]; then
            cp "$WORK/t.json" "$WORK/trace-$img.json"
            if [ -n "${TRACES:-}" ]; then mkdir -p "$TRACES"; cp "$WORK/t.json" "$TRACES/$img.json"; fi
          fi
          f=$(fetches || true)
          if [ "$base" = traced ]; then
            f="$f, prefetch took $(grep 'prefetch done' "$WORK/hyperboxd.log" | tail -1 | grep -o 'secs=[0-9.]*' | cut -c6-10) s"
            read -r p r < <(python3 -c "import json; s=json.load(open('$WORK/t.json'))['last_start']; print(s['precision'], s['recall'])")
          fi
        fi
        secs=$(elapsed "$t0" "$t1")
        echo "$img,\"$label\",$mode,$i,$secs,$bytes,$p,$r,$mem" >> "$WORK/results.csv"
        printf '%-8s %-18s %-10s run %d: %6ss, %s fetched%s%s%s\n' "$img" "$label" "$mode" "$i" "$secs" "$(numfmt --to=iec "$bytes")" \
          "${pulled_at:+ (pull $(elapsed "$t0" "$pulled_at") s)}${p:+, precision $p recall $r}" "${mem:+, hyperboxd peak ${mem} MiB}" "; link and registry CPU $(awk -v a="$c0" -v b="$c1" 'BEGIN { split(a, x); split(b, y); printf "%.2f and %.2f", y[1] - x[1], y[2] - x[2] }') s${f:+, $f}"
      done
    done
  done
  stop_slowlink
done

# ---- memory: idle, three images started, then hydrating them ----
if [ "$MEMORY" = 1 ]; then
  hb_stop; rm -rf "$HBROOT"; HBD_BIN=$BIN; hb_start
  sleep 1; read -r _ idle < <(hb_mem)
  ns=b-memory
  for img in python java gcc; do
    image "$img"
    HYPERBOX_ADDRESS="$HBSOCK" "$BIN/hyperbox" pull --plain-http --address "$SOCK" --namespace "$ns" "$REG/$REPO:hyperbox" >/dev/null 2>&1
    ctr_ -n "$ns" run --rm --snapshotter hyperbox "$REG/$REPO:hyperbox" "m-$img-$$" >/dev/null
  done
  read -r started_peak started < <(hb_mem)
  echo "three images started, now (MiB): $(parts)" >> "$WORK/parts.log"
  hm=$(wc -l < "$WORK/hyperboxd.log")
  parts_start
  for img in python java gcc; do
    "$BIN/hyperbox" prefetch --hydrate --plain-http --address "$HBSOCK" "$REG/$img:hyperbox" >/dev/null
  done
  until [ "$(tail -n +"$((hm + 1))" "$WORK/hyperboxd.log" | grep -c 'prefetch: hydrated' || true)" -ge 3 ]; do sleep 1; done
  read -r peak now_rss < <(hb_mem)
  echo "hydrating them, at the peak (MiB): $(parts_stop)" >> "$WORK/parts.log"
  {
    echo "memory,idle,,,,,,,$idle"
    echo "memory,started,,,,,,,$started_peak"
    echo "memory,hydrated,,,,,,,$peak"
  } >> "$WORK/results.csv"
  echo "hyperboxd RSS: idle $idle MiB; three images started: peak $started_peak MiB (now $started); hydrating them: peak $peak MiB (after: $now_rss MiB)"
fi

mkdir -p "$(dirname "$OUT")"
cp "$WORK/results.csv" "$OUT.csv"
python3 "$HERE/cold-start-report.py" "$OUT.csv" "$OUT.svg" | tee "$OUT.md"
if [ -s "$WORK/parts.log" ]; then
  { echo; echo "hyperboxd's memory by part (hyperbox_memory_bytes):"; echo; sed 's/^/- /' "$WORK/parts.log"; } | tee -a "$OUT.md"
fi
