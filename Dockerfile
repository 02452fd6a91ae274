# syntax=docker/dockerfile:1.7
# Both binaries (ingest-gateway and bq-sink) in one small image; Kubernetes picks one with
# `command:` (k8s/base). Build: docker build -t hookpipe:dev .
#
# Build stage: the Rust toolchain the workspace is tested with, plus OpenSSL headers for
# librdkafka's TLS/SASL (librdkafka itself is built from source by rdkafka-sys; protoc comes
# from the protoc-bin-vendored crate).
FROM rust:1.95-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends libssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin ingest-gateway --bin bq-sink \
    && mkdir -p /out \
    && cp target/release/ingest-gateway target/release/bq-sink /out/

# Runtime stage: Debian slim with only what the binaries link (libssl3, zlib; ldd-checked) and
# CA certificates for TLS to Kafka and Google; `sleep` (coreutils) serves the preStop hook.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 hookpipe \
    && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin hookpipe
COPY --from=build /out/ingest-gateway /out/bq-sink /usr/local/bin/
USER 65532:65532
# Listen on all interfaces inside the container (the binaries default to 127.0.0.1).
ENV HOOKPIPE_LISTEN=0.0.0.0:8080 \
    HOOKPIPE_LOG_FORMAT=json
EXPOSE 8080 9101 9102
CMD ["/usr/local/bin/ingest-gateway"]
