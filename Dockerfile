# syntax=docker/dockerfile:1.7
#
# The `tessera` binary in a small runtime image that runs as a non-root user. Every Kubernetes
# Deployment uses this one image and picks its role with `args` (k8s/base):
#
#     docker build -t tessera .
#     docker run --rm -e TESSERA__TLS__ALLOW_PLAINTEXT=true tessera ingestion \
#         --grpc-addr 0.0.0.0:50051 --http-addr 0.0.0.0:8080
#
# (Beyond loopback a service serves plaintext gRPC only when allowed; [tls] turns on mutual TLS.)
#
# Stages: `chef` (Rust and cargo-chef), `planner` (the dependency recipe), `builder` (the
# dependencies in their own layer, then the binary), `base` (the runtime OS and user), `dev` (a
# binary built on the host, for Tilt's live update: see the Tiltfile) and `runtime`, the last one
# and so the default. The dependency layer is rebuilt only when a Cargo.toml or Cargo.lock
# changes, not when code or protos do. Needs BuildKit, the default builder since Docker 23: it
# skips the `dev` stage when building `runtime`.

ARG RUST_IMAGE=rust:1.95.0-slim-bookworm
# The runtime image must have a glibc at least as new as the builder's (Debian 12: 2.36).
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS chef
RUN cargo install cargo-chef --version 0.1.78 --locked
WORKDIR /src

FROM chef AS planner
# Only what the workspace needs, listed, so a change to docs/ or k8s/ does not rebuild anything.
COPY Cargo.toml Cargo.lock ./
COPY libs libs
COPY services services
COPY tests tests
RUN cargo chef prepare --recipe-path recipe.json --bin tessera

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json --bin tessera
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY libs libs
COPY services services
COPY tests tests
RUN cargo build --release --locked --bin tessera \
    && install -D -m 0755 target/release/tessera /out/tessera

FROM ${RUNTIME_IMAGE} AS base
# ca-certificates: TLS to managed Postgres and Redis, OTLP collectors and webhook destinations.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 tessera \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin tessera

# Tilt's image: the binary from `cargo build` on the host, in a directory the user owns so that a
# live update can replace it, and restarted by Tilt's restart_process wrapper.
FROM base AS dev
RUN install -d -o 10001 -g 10001 /opt/tessera /opt/tessera/bin
COPY --chown=10001:10001 target/tilt/tessera /opt/tessera/bin/tessera
ENV PATH=/opt/tessera/bin:$PATH
USER 10001:10001
ENTRYPOINT ["/opt/tessera/bin/tessera"]

FROM base AS runtime
COPY --from=builder /out/tessera /usr/local/bin/tessera
USER 10001:10001
ENTRYPOINT ["tessera"]
CMD ["--help"]
