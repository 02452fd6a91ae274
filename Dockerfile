# Both binaries (ingest-gateway and bq-sink) in one small image; Kubernetes picks one with
# `command:` (k8s/base). Build with either engine, unchanged:
#
#   docker build -t hookpipe:dev .
#   podman build -t hookpipe:dev .
#
# The base images are build arguments so that a build without a registry can substitute images
# it made itself (scripts/check-image makes both from Debian packages and builds this file with
# podman in CI). Nothing here needs BuildKit: plain layers, so every builder caches the same way.
#
# BUILD_IMAGE needs a Rust toolchain (>= the workspace's rust-version), a C compiler and make
# (librdkafka and zlib are compiled from source by rdkafka-sys), pkg-config, OpenSSL headers
# and CA certificates; the official rust:*-bookworm images have all of it. RUNTIME_IMAGE needs
# glibc, libgcc_s, libssl3 and CA certificates, and nothing else: no shell, no package manager.
ARG BUILD_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${BUILD_IMAGE} AS build
WORKDIR /src
# Dependency layer: the manifests, the lock file and the protobuf crate (it rarely changes)
# with empty stand-ins for the other crates' sources, built once. A change to our own code
# reuses this layer and compiles only the workspace crates.
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY common/Cargo.toml common/
COPY ingest-gateway/Cargo.toml ingest-gateway/
COPY bq-sink/Cargo.toml bq-sink/
COPY tests/Cargo.toml tests/
COPY bench/Cargo.toml bench/
RUN for crate in common ingest-gateway bq-sink tests bench; do \
        mkdir -p "$crate/src" && : > "$crate/src/lib.rs"; \
    done \
    && echo 'fn main() {}' > ingest-gateway/src/main.rs \
    && echo 'fn main() {}' > bq-sink/src/main.rs \
    && cargo build --release --locked -p ingest-gateway -p bq-sink \
    && rm -rf common/src ingest-gateway/src bq-sink/src
# The real sources. COPY keeps the files' own modification times, which are older than the
# stand-ins' build: touched so that cargo compiles them instead of keeping the stand-ins.
COPY common common
COPY ingest-gateway ingest-gateway
COPY bq-sink bq-sink
RUN find common ingest-gateway bq-sink -name '*.rs' -exec touch {} + \
    && cargo build --release --locked --bin ingest-gateway --bin bq-sink \
    && mkdir -p /out \
    && cp target/release/ingest-gateway target/release/bq-sink /out/

# Runtime: the binaries and what they link (glibc, libgcc_s, libssl3; zlib is linked
# statically), CA certificates for TLS to Kafka and Google. Runs as uid 65532 (the distroless
# `nonroot` user) with a read-only root filesystem in k8s/; needs no shell: the preStop delay
# is Kubernetes' own `sleep` action, the probes are HTTP.
FROM ${RUNTIME_IMAGE}
COPY --from=build /out/ingest-gateway /out/bq-sink /usr/local/bin/
USER 65532:65532
# Listen on all interfaces inside the container (the binaries default to 127.0.0.1).
# One glibc malloc arena instead of up to 8 per core: the gateway's peak RSS at 1,000
# connections is 29-33 MiB with it, 36 with 2 and 41 with glibc's default, at the same throughput
# (docs/benchmarks.md, "Issue #14, round 3"). The sink's Deployment sets 2 (not measured with 1).
ENV HOOKPIPE_LISTEN=0.0.0.0:8080 \
    HOOKPIPE_LOG_FORMAT=json \
    MALLOC_ARENA_MAX=1
EXPOSE 8080 9101 9102
CMD ["/usr/local/bin/ingest-gateway"]
