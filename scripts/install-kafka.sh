#!/usr/bin/env bash
# Installs the Apache Kafka broker the tests run: the classpath of org.apache.kafka:kafka_2.13
# (version in scripts/kafka/pom.xml) resolved by Maven from Maven Central into a cache folder.
# A fresh machine pays once (about 10 s and 55 MB); later runs find it and return at once.
# Prints the folder holding the jars. Needs Java 17+ and Maven (both on the project's machines).
#   LOGBRIDGE_CACHE   cache root (default ~/.cache/logbridge)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
pom=$here/kafka/pom.xml
version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom")
cache=${LOGBRIDGE_CACHE:-$HOME/.cache/logbridge}
home=$cache/kafka-$version
libs=$home/libs

# A finished install leaves this marker, written last: a run cut short is done again.
if [ -f "$home/installed" ]; then
    echo "$libs"
    exit 0
fi
for tool in java mvn; do
    command -v $tool >/dev/null || { echo "install-kafka: $tool not found (Java 17+ and Maven are needed)" >&2; exit 1; }
done
mkdir -p "$home"
# Two test binaries (or two checkouts) may install at once: one does, the other waits.
exec 9>"$home.lock"
flock 9
if [ ! -f "$home/installed" ]; then
    echo "install-kafka: resolving Apache Kafka $version from Maven Central into $home" >&2
    rm -rf "$libs"
    mvn -B -q -Dstyle.color=never -f "$pom" dependency:copy-dependencies -DoutputDirectory="$libs" -DincludeScope=runtime >&2
    ls "$libs"/kafka_2.13-"$version".jar >/dev/null
    echo "$version" > "$home/installed"
fi
echo "$libs"
