# syntax=docker/dockerfile:1
#
# corral in a container: built with the Rust toolchain, run from a slim Debian that holds only
# the binary, CA certificates and a non-root user.
#
# Run with:
#   docker build -t corral .
#   docker run --rm -p 8080:8080 \
#     -e REDIS_URL=redis://redis:6379/ -e NATS_URL=nats://nats:4222 \
#     -v "$PWD/my-corral.yaml:/etc/corral/corral.yaml:ro" corral
# or the whole picture (three replicas, load balancer, Redis, NATS, Prometheus, Grafana):
#   docker compose up --build

# ---- build -------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS build
WORKDIR /src

# Dependencies first, on a placeholder crate with the real manifest and lockfile: this layer is
# rebuilt only when Cargo.toml or Cargo.lock (or the placeholder script) change, not on every
# source edit. scripts/placeholders writes a stub at every target path Cargo.toml declares (lib,
# bins, benches, ...), so the list of targets lives in Cargo.toml alone.
COPY Cargo.toml Cargo.lock ./
COPY scripts/placeholders /usr/local/bin/corral-placeholders
RUN sh /usr/local/bin/corral-placeholders . \
    && cargo build --release --locked --bin corral \
    && rm -rf src

# The crate itself. Touch the entry points so cargo rebuilds them over the placeholders.
# CORRAL_COMMIT names the build in corral_build_info{commit}:
#   docker build --build-arg CORRAL_COMMIT="$(git rev-parse --short HEAD)" -t corral .
ARG CORRAL_COMMIT=unknown
ENV CORRAL_COMMIT=$CORRAL_COMMIT
COPY src ./src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin corral \
    && strip target/release/corral

# ---- run ---------------------------------------------------------------------------------
FROM debian:bookworm-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin corral

COPY --from=build /src/target/release/corral /usr/local/bin/corral
# A config to start from; mount your own over it.
COPY deploy/corral/corral.yaml /etc/corral/corral.yaml

ENV CORRAL_CONFIG=/etc/corral/corral.yaml \
    CORRAL_LOG_FORMAT=json \
    RUST_LOG=corral=info

USER corral
# 8080: the proxy. 8081: /healthz, /readyz, /metrics and /admin/* (keep it off the public network).
EXPOSE 8080 8081

# The image has no curl: the binary asks its own admin listener (CORRAL_HEALTHCHECK_URL, by
# default http://127.0.0.1:8081/healthz).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["corral", "healthcheck"]

ENTRYPOINT ["corral"]
CMD ["serve"]
