# hyperboxd and the hyperbox CLI in a container image, for the Kubernetes
# DaemonSet in packaging/kubernetes/. Build from the repository root:
#   docker build -t ghcr.io/hyperbox/hyperboxd:0.1.0 .
# The first build compiles RocksDB from source (about 20 minutes on 2 cores).

FROM rust:1-bookworm AS builder
# What the build needs (as scripts/deps.sh installs): protoc for the
# containerd-snapshots crate and build.rs, clang and libclang for RocksDB.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      clang libclang-dev protobuf-compiler pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
 && cp target/release/hyperboxd target/release/hyperbox /usr/local/bin/

FROM debian:bookworm-slim
# fuse3: fusermount3, the fallback when a direct FUSE mount is refused.
# ca-certificates: https to registries.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      fuse3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /usr/local/bin/hyperboxd /usr/local/bin/hyperboxd
COPY --from=builder /usr/local/bin/hyperbox /usr/local/bin/hyperbox
ENTRYPOINT ["/usr/local/bin/hyperboxd"]
