# logbridge image: built from source in one stage, run from a slim Debian in the next.
FROM rust:1-bookworm AS build
WORKDIR /src
# librdkafka (and the OpenSSL it uses for TLS and SASL) is built from source by the rdkafka
# crate: it needs a C toolchain, make and perl, which the rust image has.
# Exactly what the build reads (scripts/check-image-context.sh type-checks the crate from these
# paths in the test command, so a file read from elsewhere fails the tests, not `docker build`):
# the runbook is compiled into the binary (`/runbook`).
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY docs/runbook.md ./docs/runbook.md
RUN cargo build --release --locked --bin logbridge

FROM debian:bookworm-slim
# CA certificates, so that TLS to a managed cluster (MSK, Confluent Cloud, Aiven) verifies
# against the public CAs without a ca_file; logbridge finds them in /etc/ssl/certs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# A fixed numeric id (the Helm chart's runAsUser), so Kubernetes can check runAsNonRoot.
RUN groupadd --system --gid 65532 logbridge \
    && useradd --system --uid 65532 --gid 65532 --home-dir /var/lib/logbridge --create-home logbridge \
    && mkdir -p /var/lib/logbridge/out && chown logbridge:logbridge /var/lib/logbridge/out
COPY --from=build /src/target/release/logbridge /usr/local/bin/logbridge
COPY config/logbridge.toml /etc/logbridge/logbridge.toml
USER 65532:65532
WORKDIR /var/lib/logbridge
EXPOSE 9898
# The image has no curl: logbridge asks its own /healthz (`http.listen` on port 9898).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["logbridge", "health", "--address", "127.0.0.1:9898"]
# SIGTERM drains in-flight records and commits; give it drain_timeout_ms plus a margin.
STOPSIGNAL SIGTERM
ENTRYPOINT ["logbridge"]
CMD ["--log-format", "json", "run", "--config", "/etc/logbridge/logbridge.toml"]
