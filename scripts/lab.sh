# A registry and a containerd (with hyperboxd as its proxy snapshotter) in a
# scratch dir, for scripts/demo.sh and benches/cold-start.sh. Source it after
# setting WORK (the scratch dir) and PIDS (an array: every process started
# here is added, for the caller's cleanup to kill).

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
# the proxy snapshotter `hyperbox`; CRI off. Sets SOCK (its socket).
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

# Wait until the registry answers (30 s at most).
wait_registry() {
  local _
  for _ in $(seq 300); do
    curl -fsS "http://$REG/v2/" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "the registry did not start; see $WORK/registry.log" >&2
  return 1
}

# Wait until the registry and containerd answer (30 s each at most).
wait_ready() {
  local _
  wait_registry || return 1
  for _ in $(seq 300); do
    ctr --address "$SOCK" version >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "containerd did not start; see $WORK/containerd.log" >&2
  return 1
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
# a config with Cmd $2 and Env $3 (JSON arrays), tagged $4. Sets OCI, and
# for the caller DIFF_ID, TAR_SIZE, LAYER and LSIZE (the gzip blob), CONFIG
# and MANIFEST (digests, hex).
oci_image() {
  local root=$1 cmd=$2 env=$3 tag=$4 csize msize
  OCI=$WORK/oci; mkdir -p "$OCI/blobs/sha256"
  tar "${TAR_FLAGS[@]}" -C "$root" -cf "$WORK/layer.tar" .
  DIFF_ID=$(sha256sum "$WORK/layer.tar" | cut -d' ' -f1); TAR_SIZE=$(stat -c %s "$WORK/layer.tar")
  gzip "-${GZIP_LEVEL:-6}" -c "$WORK/layer.tar" > "$WORK/layer.gz"; rm "$WORK/layer.tar"
  LSIZE=$(stat -c %s "$WORK/layer.gz"); LAYER=$(oci_blob "$WORK/layer.gz")
  printf '{"architecture":"%s","os":"linux","config":{"Cmd":%s,"Env":%s},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$(dpkg --print-architecture)" "$cmd" "$env" "$DIFF_ID" > "$WORK/config.json"
  csize=$(stat -c %s "$WORK/config.json"); CONFIG=$(oci_blob "$WORK/config.json")
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%d}]}' \
    "$CONFIG" "$csize" "$LAYER" "$LSIZE" > "$WORK/manifest.json"
  msize=$(stat -c %s "$WORK/manifest.json"); MANIFEST=$(oci_blob "$WORK/manifest.json")
  echo '{"imageLayoutVersion":"1.0.0"}' > "$OCI/oci-layout"
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%d,"annotations":{"org.opencontainers.image.ref.name":"%s"}}]}' \
    "$MANIFEST" "$msize" "$tag" > "$OCI/index.json"
}

# Move file $1 into the layout's blobs under its sha256; print the digest.
oci_blob() { local d; d=$(sha256sum "$1" | cut -d' ' -f1); mv "$1" "$OCI/blobs/sha256/$d"; echo "$d"; }
