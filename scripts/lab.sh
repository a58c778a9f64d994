# shellcheck shell=bash
# A registry and a containerd (with hyperboxd as its proxy snapshotter) in a
# scratch dir, for scripts/demo.sh and the benchmark scripts. Source it after
# setting WORK (the scratch dir) and PIDS (an array: every process started
# here is added, for the caller's cleanup to kill). hyperboxd and the slow
# link are restarted along the way, so their pids are in HBPID and LINKPID
# instead (empty when not running): the caller's cleanup kills those too.

LAB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

now() { date +%s.%N; }
# Seconds from $1 to $2 (both from `now`), two decimals.
elapsed() { python3 -c "print(f'{$2 - $1:.2f}')"; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Start docker-registry on a free loopback port, with its access log in
# $WORK/registry.log (what `served` reads). Sets REG (host:port).
start_registry() {
  REG=127.0.0.1:$(free_port)
  cat > "$WORK/registry.yml" <<YML
version: 0.1
log: { level: warn, accesslog: { disabled: false } }
storage: { filesystem: { rootdirectory: $WORK/registry } }
http: { addr: $REG }
YML
  docker-registry serve "$WORK/registry.yml" > "$WORK/registry.log" 2>&1 &
  PIDS+=($!)
}

# Start containerd with its state under $WORK and hyperboxd's socket ($1) as
# the proxy snapshotter `hyperbox`; CRI off. Sets SOCK (its socket): ctr_
# below talks to it.
start_containerd() {
  SOCK=$WORK/containerd.sock
  cat > "$WORK/containerd.toml" <<TOML
version = 2
root = "$WORK/containerd/root"
state = "$WORK/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$SOCK"
[plugins."io.containerd.internal.v1.opt"]
  path = "$WORK/containerd/opt"
[proxy_plugins.hyperbox]
  type = "snapshot"
  address = "$1"
TOML
  containerd --config "$WORK/containerd.toml" > "$WORK/containerd.log" 2>&1 &
  PIDS+=($!)
}
# ctr on that containerd.
ctr_() { ctr --address "$SOCK" "$@"; }

# Wait until the registry answers (30 s at most).
wait_registry() { wait_v2 "$REG" "the registry" "$WORK/registry.log"; }

# Wait until http://$1/v2/ answers (30 s at most); else name $2 and its log $3.
wait_v2() {
  local _
  for _ in $(seq 300); do
    curl -fsS "http://$1/v2/" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "$2 did not start; see $3" >&2
  return 1
}

# Wait until the registry and containerd answer (30 s each at most).
wait_ready() {
  local _
  wait_registry || return 1
  for _ in $(seq 300); do
    ctr_ version >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "containerd did not start; see $WORK/containerd.log" >&2
  return 1
}

# Start hyperboxd ($HBD_BIN/hyperboxd, default $BIN/hyperboxd) with root
# $HBROOT, socket $HBSOCK and config $1 (default $WORK/hyperbox.toml), its log
# appended to $WORK/hyperboxd.log; wait until containerd (start_containerd,
# wait_ready) reaches it. Sets HBPID.
# shellcheck disable=SC2120  # $1 is optional
hb_start() {
  "${HBD_BIN:-$BIN}/hyperboxd" --root "$HBROOT" --address "$HBSOCK" --config "${1:-$WORK/hyperbox.toml}" >> "$WORK/hyperboxd.log" 2>&1 &
  HBPID=$!
  until [ -S "$HBSOCK" ]; do hb_alive || return 1; sleep 0.05; done
  # containerd redials a restarted proxy with backoff: wait until it answers.
  local n=0
  until ctr_ -n probe snapshot --snapshotter hyperbox prepare "probe-$n" >/dev/null 2>&1; do
    hb_alive || return 1; n=$((n + 1)); sleep 0.2
  done
  ctr_ -n probe snapshot --snapshotter hyperbox rm "probe-$n" >/dev/null
}
hb_alive() {
  kill -0 "$HBPID" 2>/dev/null && return 0
  echo "hyperboxd exited; its log: $WORK/hyperboxd.log" >&2; tail -n 20 "$WORK/hyperboxd.log" >&2; return 1
}
hb_stop() { kill "$HBPID"; wait "$HBPID" || true; HBPID=; }

# Start benches/slowlink.py between the clients and the registry: a link of
# $1 Mbit/s with $2 ms one-way delay, on a free loopback port, its log in
# $WORK/slowlink.log; wait until the registry answers through it. Sets VIA
# (host:port: pull $VIA/REPO:TAG to go over the link) and LINKPID.
start_slowlink() {
  local port
  port=$(free_port)
  python3 "$LAB_DIR/../benches/slowlink.py" "$port" "$REG" "$1" "$2" > "$WORK/slowlink.log" 2>&1 &
  LINKPID=$!
  VIA=127.0.0.1:$port
  wait_v2 "$VIA" "the slow link" "$WORK/slowlink.log"
}
stop_slowlink() { kill "$LINKPID"; wait "$LINKPID" 2>/dev/null || true; LINKPID=; }

# Once hyperboxd (socket $HBSOCK) has merged at least $3 runs into the trace
# of image $2, export it to file $4, with the hyperbox CLI $1. hyperboxd
# merges a start's run once it has read nothing new for [trace] idle_secs, or
# after window_secs (60 s by default): this waits 2 minutes at most.
wait_trace() {
  local _
  for _ in $(seq 240); do
    "$1" trace --address "$HBSOCK" export "$2" "$4" >/dev/null 2>&1 &&
      python3 -c "import json,sys; sys.exit(0 if json.load(open('$4'))['runs'] >= $3 else 1)" && return 0
    sleep 0.5
  done
  echo "no trace of $2 with $3 run(s) after 2 minutes; see $WORK/hyperboxd.log" >&2
  return 1
}

# Bytes of the HyperBox layers of image $1 (their blobs in the registry).
hyperbox_layer_bytes() {
  "$BIN/hyperbox" inspect --plain-http --json "$1" | python3 -c 'import json,sys; print(sum(r["blob_size"] for r in json.load(sys.stdin)))'
}

# Lines in the registry's log so far: a mark for `served`.
loglines() { wc -l < "$WORK/registry.log"; }

# Bytes the registry sent for blob GETs since log line $1.
served() { tail -n +"$(($1 + 1))" "$WORK/registry.log" | python3 -c '
import re, sys
print(sum(int(m.group(2)) for l in sys.stdin if "/blobs/" in l and "\"GET " in l
          for m in [re.search(r"HTTP/1.1\" (2\d\d) (\d+)", l)] if m))'; }

# Write an OCI image layout at $WORK/oci: one gzip layer of the tree $1 (the
# tar's flags in TAR_FLAGS, an array; `gzip -$GZIP_LEVEL`, 6 by default),
# a config with Cmd $2 and Env $3 (JSON arrays), tagged $4. Paths after
# that (relative to $1, none inside another) each get a layer of their own,
# after a first layer of everything else, as a Dockerfile's COPY steps
# would. Sets OCI, and for the caller LAYERS (the gzip blobs' digests, hex,
# bottom first), LAYER (the first), TAR_SIZE and LSIZE (all layers
# together), DIFF_ID (the first layer's), CONFIG and MANIFEST (digests, hex).
# shellcheck disable=SC2034  # DIFF_ID, TAR_SIZE, ...: for the caller
oci_image() {
  local root=$1 cmd=$2 env=$3 tag=$4 csize msize size diff p
  shift 4
  OCI=$WORK/oci; mkdir -p "$OCI/blobs/sha256"
  local excl=() diff_ids=() descs=()
  for p in "$@"; do excl+=("--exclude=./$p"); done
  LAYERS=(); TAR_SIZE=0; LSIZE=0; DIFF_ID=
  for p in "" "$@"; do
    if [ -z "$p" ]; then tar "${TAR_FLAGS[@]}" "${excl[@]}" -C "$root" -cf "$WORK/layer.tar" .
    else tar "${TAR_FLAGS[@]}" -C "$root" -cf "$WORK/layer.tar" "./$p"; fi
    diff=$(sha256sum "$WORK/layer.tar" | cut -d' ' -f1); DIFF_ID=${DIFF_ID:-$diff}
    TAR_SIZE=$((TAR_SIZE + $(stat -c %s "$WORK/layer.tar")))
    gzip "-${GZIP_LEVEL:-6}" -c "$WORK/layer.tar" > "$WORK/layer.gz"; rm "$WORK/layer.tar"
    size=$(stat -c %s "$WORK/layer.gz"); LSIZE=$((LSIZE + size))
    LAYERS+=("$(oci_blob "$WORK/layer.gz")")
    diff_ids+=("\"sha256:$diff\"")
    descs+=("{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:${LAYERS[-1]}\",\"size\":$size}")
  done
  LAYER=${LAYERS[0]}
  printf '{"architecture":"%s","os":"linux","config":{"Cmd":%s,"Env":%s},"rootfs":{"type":"layers","diff_ids":[%s]}}' \
    "$(dpkg --print-architecture)" "$cmd" "$env" "$(IFS=,; echo "${diff_ids[*]}")" > "$WORK/config.json"
  csize=$(stat -c %s "$WORK/config.json"); CONFIG=$(oci_blob "$WORK/config.json")
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[%s]}' \
    "$CONFIG" "$csize" "$(IFS=,; echo "${descs[*]}")" > "$WORK/manifest.json"
  msize=$(stat -c %s "$WORK/manifest.json"); MANIFEST=$(oci_blob "$WORK/manifest.json")
  echo '{"imageLayoutVersion":"1.0.0"}' > "$OCI/oci-layout"
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%d,"annotations":{"org.opencontainers.image.ref.name":"%s"}}]}' \
    "$MANIFEST" "$msize" "$tag" > "$OCI/index.json"
}

# Move file $1 into the layout's blobs under its sha256; print the digest.
oci_blob() { local d; d=$(sha256sum "$1" | cut -d' ' -f1); mv "$1" "$OCI/blobs/sha256/$d"; echo "$d"; }
