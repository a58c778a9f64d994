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
PID=
trap '[ -n "$PID" ] && kill $PID 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
REG=127.0.0.1:$PORT
printf 'version: 0.1\nlog: { level: warn }\nstorage: { filesystem: { rootdirectory: %s/registry } }\nhttp: { addr: %s }\n' "$WORK" "$REG" > "$WORK/registry.yml"
docker-registry serve "$WORK/registry.yml" > "$WORK/registry.log" 2>&1 & PID=$!
until curl -fsS "http://$REG/v2/" >/dev/null 2>&1; do sleep 0.1; done

# The source image: one gzip layer, as `docker build` would push it.
OCI=$WORK/oci; mkdir -p "$OCI/blobs/sha256"
blob() { local d; d=$(sha256sum "$1" | cut -d' ' -f1); mv "$1" "$OCI/blobs/sha256/$d"; echo "$d"; }
tar --numeric-owner --xattrs -C "$DIR/rootfs" -cf "$WORK/layer.tar" .
DIFF_ID=$(sha256sum "$WORK/layer.tar" | cut -d' ' -f1); TAR_SIZE=$(stat -c %s "$WORK/layer.tar")
gzip -6 -c "$WORK/layer.tar" > "$WORK/layer.gz"; rm "$WORK/layer.tar"
LSIZE=$(stat -c %s "$WORK/layer.gz"); LAYER=$(blob "$WORK/layer.gz")
printf '{"architecture":"%s","os":"linux","config":{"Cmd":["python3"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' "$(dpkg --print-architecture)" "$DIFF_ID" > "$WORK/c.json"
CSIZE=$(stat -c %s "$WORK/c.json"); CONFIG=$(blob "$WORK/c.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%d}]}' "$CONFIG" "$CSIZE" "$LAYER" "$LSIZE" > "$WORK/m.json"
MSIZE=$(stat -c %s "$WORK/m.json"); MANIFEST=$(blob "$WORK/m.json")
echo '{"imageLayoutVersion":"1.0.0"}' > "$OCI/oci-layout"
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%d,"annotations":{"org.opencontainers.image.ref.name":"src"}}]}' "$MANIFEST" "$MSIZE" > "$OCI/index.json"
echo "image: $(numfmt --to=iec "$TAR_SIZE") tar, $(numfmt --to=iec "$LSIZE") gzip"

for i in $(seq "$RUNS"); do
  tag="hb$i"
  start=$(date +%s.%N)
  "$BIN" convert -q --plain-http "oci:$OCI:src" "$REG/python:$tag" | tail -2 | head -1
  end=$(date +%s.%N)
  python3 -c "print(f'run $i: {($end-$start):.2f}s wall, {($TAR_SIZE/1e6)/($end-$start):.0f} MB/s of tar')"
done
