#!/usr/bin/env bash
# The HyperBox demo: start a registry and a containerd in a temp dir, build a
# sample image, convert it to HyperBox layers, and show that a vanilla
# containerd (overlayfs snapshotter) pulls and runs the converted image.
set -euo pipefail

BIN=${CARGO_TARGET_DIR:-$(pwd)/target}/release
HYPERBOX="$BIN/hyperbox"
[ -x "$HYPERBOX" ] || { echo "demo: build first (make demo does)"; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "demo: containerd needs root; run as root"; exit 1; }

WORK=$(mktemp -d /tmp/hyperbox-demo.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  grep -o " $WORK[^ ]*" /proc/self/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
REG=127.0.0.1:$PORT

step "starting docker-registry on $REG and containerd in $WORK"
cat > "$WORK/registry.yml" <<YML
version: 0.1
log: { level: warn }
storage: { filesystem: { rootdirectory: $WORK/registry } }
http: { addr: $REG }
YML
docker-registry serve "$WORK/registry.yml" > "$WORK/registry.log" 2>&1 &
PIDS+=($!)
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
TOML
containerd --config "$WORK/containerd.toml" > "$WORK/containerd.log" 2>&1 &
PIDS+=($!)
CTR=(ctr --address "$SOCK" --namespace demo)
for _ in $(seq 100); do
  curl -fsS "http://$REG/v2/" >/dev/null 2>&1 && "${CTR[@]}" version >/dev/null 2>&1 && break
  sleep 0.1
done

step "building a sample OCI image: busybox plus 64 MiB of application data"
ROOT=$WORK/rootfs
mkdir -p "$ROOT/bin" "$ROOT/etc" "$ROOT/app" "$ROOT/tmp"
cp /bin/busybox "$ROOT/bin/busybox"
for a in sh cat echo ls wc head sha256sum; do ln -s busybox "$ROOT/bin/$a"; done
echo 'root:x:0:0:root:/root:/bin/sh' > "$ROOT/etc/passwd"
echo 'Hello from a HyperBox image!' > "$ROOT/app/greeting.txt"
head -c $((64 << 20)) /dev/urandom > "$ROOT/app/model.bin"
OCI=$WORK/oci
mkdir -p "$OCI/blobs/sha256"
blob() { local d; d=$(sha256sum "$1" | cut -d' ' -f1); mv "$1" "$OCI/blobs/sha256/$d"; echo "$d"; }
tar --sort=name --mtime=@1700000000 --owner=0 --group=0 --numeric-owner -C "$ROOT" -cf "$WORK/layer.tar" .
DIFF_ID=$(sha256sum "$WORK/layer.tar" | cut -d' ' -f1)
gzip -1 -c "$WORK/layer.tar" > "$WORK/layer.tar.gz"
LAYER_SIZE=$(stat -c %s "$WORK/layer.tar.gz"); LAYER=$(blob "$WORK/layer.tar.gz")
ARCH=$(dpkg --print-architecture)
printf '{"architecture":"%s","os":"linux","config":{"Cmd":["cat","/app/greeting.txt"],"Env":["PATH=/bin"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
  "$ARCH" "$DIFF_ID" > "$WORK/config.json"
CONFIG_SIZE=$(stat -c %s "$WORK/config.json"); CONFIG=$(blob "$WORK/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%d}]}' \
  "$CONFIG" "$CONFIG_SIZE" "$LAYER" "$LAYER_SIZE" > "$WORK/manifest.json"
MANIFEST_SIZE=$(stat -c %s "$WORK/manifest.json"); MANIFEST=$(blob "$WORK/manifest.json")
echo '{"imageLayoutVersion":"1.0.0"}' > "$OCI/oci-layout"
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%d,"annotations":{"org.opencontainers.image.ref.name":"v1"}}]}' \
  "$MANIFEST" "$MANIFEST_SIZE" > "$OCI/index.json"
echo "image oci:$OCI:v1 (layer $(numfmt --to=iec "$LAYER_SIZE") gzip)"

step "hyperbox convert oci:$OCI:v1 $REG/demo:hyperbox"
"$HYPERBOX" convert --plain-http "oci:$OCI:v1" "$REG/demo:hyperbox"

step "hyperbox inspect (reads only the index, with one range request per layer)"
"$HYPERBOX" inspect --plain-http "$REG/demo:hyperbox"

step "a vanilla containerd (overlayfs snapshotter) pulls and runs the converted image"
start=$(date +%s.%N)
"${CTR[@]}" image pull --plain-http "$REG/demo:hyperbox" >/dev/null
"${CTR[@]}" run --rm "$REG/demo:hyperbox" demo1
end=$(date +%s.%N)
printf 'time to output with a full pull: %.2fs\n' "$(echo "$end - $start" | bc -l 2>/dev/null || python3 -c "print($end-$start)")"
"${CTR[@]}" run --rm "$REG/demo:hyperbox" demo2 sh -c 'wc -c /app/model.bin'

step "done"
echo "Lazy starts through the hyperbox snapshotter come with hyperboxd (see docs/architecture.md)."
