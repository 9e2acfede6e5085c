#!/usr/bin/env bash
# Runs one Apache Kafka broker (KRaft, broker and controller in one process) on loopback, in the
# foreground, for measuring by hand: `logbridge bench --brokers 127.0.0.1:19092`. Ctrl-C (or
# SIGTERM) stops it and removes its data. The tests start their own brokers; this is not used by
# them.
#
#   bash scripts/apache-broker.sh [port]     # default 19092; the controller listens on port+1
set -euo pipefail
cd "$(dirname "$0")/.."
port="${1:-19092}"
controller=$((port + 1))
libs="$(bash scripts/install-kafka.sh)"
dir="$(mktemp -d -t logbridge-broker.XXXXXX)"
trap 'rm -rf "$dir"' EXIT
cat > "$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$dir/data
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
EOF
cat > "$dir/log4j2.properties" <<EOF
rootLogger.level=WARN
rootLogger.appenderRef.stdout.ref=STDOUT
appender.stdout.type=Console
appender.stdout.name=STDOUT
appender.stdout.layout.type=PatternLayout
appender.stdout.layout.pattern=[%d] %p %m (%c)%n
EOF
java_cmd=(java -Xms512m -Xmx1g -Dlog4j2.configurationFile="$dir/log4j2.properties" -cp "$libs/*")
cluster_id="$("${java_cmd[@]}" kafka.tools.StorageTool random-uuid)"
"${java_cmd[@]}" kafka.tools.StorageTool format -t "$cluster_id" -c "$dir/server.properties" > /dev/null
echo "apache-broker: Apache Kafka on 127.0.0.1:$port (data in $dir)" >&2
"${java_cmd[@]}" kafka.Kafka "$dir/server.properties" &
broker=$!
trap 'kill "$broker" 2>/dev/null; wait "$broker" 2>/dev/null; rm -rf "$dir"' EXIT INT TERM
wait "$broker"
