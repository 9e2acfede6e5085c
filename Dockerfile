# logbridge image: built from source in one stage, run from a slim Debian in the next.
FROM rust:1-bookworm AS build
WORKDIR /src
# librdkafka (and the OpenSSL it uses for TLS and SASL) is built from source by the rdkafka
# crate: it needs a C toolchain, make and perl, which the rust image has.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
RUN cargo build --release --locked --bin logbridge

FROM debian:bookworm-slim
# CA certificates, so that TLS to a managed cluster (MSK, Confluent Cloud, Aiven) verifies
# against the public CAs without a ca_file; logbridge finds them in /etc/ssl/certs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --home-dir /var/lib/logbridge --create-home logbridge \
    && mkdir -p /var/lib/logbridge/out && chown logbridge /var/lib/logbridge/out
COPY --from=build /src/target/release/logbridge /usr/local/bin/logbridge
COPY config/logbridge.toml /etc/logbridge/logbridge.toml
USER logbridge
WORKDIR /var/lib/logbridge
EXPOSE 9898
# SIGTERM drains in-flight records and commits; give it drain_timeout_ms plus a margin.
STOPSIGNAL SIGTERM
ENTRYPOINT ["logbridge"]
CMD ["--log-format", "json", "run", "--config", "/etc/logbridge/logbridge.toml"]
