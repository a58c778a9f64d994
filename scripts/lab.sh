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

# Wait until the registry and containerd answer (30 s at most).
wait_ready() {
  local _
  for _ in $(seq 300); do
    curl -fsS "http://$REG/v2/" >/dev/null 2>&1 && ctr --address "$SOCK" version >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "the registry or containerd did not start; see $WORK/registry.log and $WORK/containerd.log" >&2
  return 1
}

# Lines in the registry's log so far: a mark for `served`.
loglines() { wc -l < "$WORK/registry.log"; }

# Bytes the registry sent for blob GETs since log line $1.
served() { tail -n +"$(($1 + 1))" "$WORK/registry.log" | python3 -c '
import re, sys
print(sum(int(m.group(2)) for l in sys.stdin if "/blobs/" in l and "\"GET " in l
          for m in [re.search(r"HTTP/1.1\" (2\d\d) (\d+)", l)] if m))'; }
