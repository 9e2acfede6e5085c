#!/usr/bin/env bash
# Installs what tests/kubernetes.rs checks the Helm chart (deploy/helm/logbridge) with, all from
# the Go module proxy, into a cache folder:
#   bin/helm          Helm, built from helm.sh/helm/v4
#   bin/kubeconform   kubeconform, built from github.com/yannh/kubeconform
#   schemas/          one strict JSON schema per kind, in kubeconform's layout, converted by
#                     scripts/k8s/openapi2jsonschema.py from the Kubernetes OpenAPI document
#                     (api/openapi-spec/swagger.json of the k8s.io/kubernetes module) and from
#                     the CRDs of KEDA (ScaledObject) and the Prometheus operator
#                     (ServiceMonitor, PodMonitor, PrometheusRule)
# Validation then needs no network: kubeconform -schema-location
#   "$dir/schemas/{{ .ResourceKind }}{{ .KindSuffix }}.json".
# A fresh machine pays once: 2.5 to 4 minutes on 2 cores, nearly all of it building Helm, and
# about 150 MB of modules from the proxy; it keeps about 140 MB (the two binaries and the
# schemas). Later runs find the marker and return at once.
# Prints the folder (bin/ and schemas/ below it). Needs Go 1.26+ and Python 3 with PyYAML.
#   LOGBRIDGE_CACHE   cache root (default ~/.cache/logbridge)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
converter=$here/k8s/openapi2jsonschema.py

helm_version=v4.3.2
kubeconform_version=v0.8.0
# The schemas are those of the oldest Kubernetes minor the proxy serves here: a field that only
# newer clusters know fails the check rather than an older cluster's apply.
kubernetes_version=v1.34.4
keda_version=v2.21.0                    # v2.21.1 needs Go 1.27
prometheus_operator_version=v0.85.0     # the newest version of the main module (its CRDs) served

cache=${LOGBRIDGE_CACHE:-$HOME/.cache/logbridge}
# The tools are built once per pair of versions; the schemas are made per set of sources and per
# converter (its checksum is in the name), beside a link to the tools.
bin=$cache/k8s-bin-helm-$helm_version-kubeconform-$kubeconform_version
converter_sum=$(sha256sum "$converter" | cut -c1-12)
home=$cache/k8s-tools-helm-$helm_version-kubeconform-$kubeconform_version-k8s-$kubernetes_version-keda-$keda_version-promop-$prometheus_operator_version-$converter_sum

# A finished install leaves this marker, written last: a run cut short is done again.
if [ -f "$home/installed" ]; then
    echo "$home"
    exit 0
fi
command -v python3 >/dev/null || { echo "install-k8s-tools: python3 not found" >&2; exit 1; }
# The schema converter reads the CRDs' YAML (PyYAML, from PyPI where this Python lacks it).
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check pyyaml >&2
python3 -c 'import yaml' || { echo "install-k8s-tools: Python 3 lacks PyYAML and pip could not install it" >&2; exit 1; }
# shellcheck source=lib/go-tools.sh
. "$here/lib/go-tools.sh"
go_tools_lock k8s-tools
if [ ! -f "$home/installed" ]; then
    # Modules and build objects (about 500 MB and 1.2 GB) go to a scratch folder; only the two
    # binaries and the schemas are kept.
    go_tools_scratch
    if [ ! -f "$bin/installed" ]; then
        echo "install-k8s-tools: building helm $helm_version and kubeconform $kubeconform_version into $bin" >&2
        rm -rf "$bin"
        mkdir -p "$bin"
        GOBIN=$bin go install "helm.sh/helm/v4/cmd/helm@$helm_version"
        GOBIN=$bin go install "github.com/yannh/kubeconform/cmd/kubeconform@$kubeconform_version"
        "$bin/helm" version >&2
        printf 'helm %s\nkubeconform %s\n' "$helm_version" "$kubeconform_version" > "$bin/installed"
    fi

    rm -rf "$home"
    mkdir -p "$home"
    ln -s "$bin" "$home/bin"
    module_dir() {
        go mod download -json "$1" \
            | python3 -c 'import json, sys; d = json.load(sys.stdin); sys.exit(d["Error"]) if d.get("Error") else print(d["Dir"])'
    }
    echo "install-k8s-tools: converting the OpenAPI document of k8s.io/kubernetes $kubernetes_version and the CRDs of KEDA $keda_version and prometheus-operator $prometheus_operator_version" >&2
    kubernetes=$(module_dir "k8s.io/kubernetes@$kubernetes_version")
    keda=$(module_dir "github.com/kedacore/keda/v2@$keda_version")
    operator=$(module_dir "github.com/prometheus-operator/prometheus-operator@$prometheus_operator_version")
    swagger=$kubernetes/api/openapi-spec/swagger.json
    crds=$operator/example/prometheus-operator-crd
    python3 "$converter" k8s "$swagger" "$home/schemas"
    python3 "$converter" crd "$swagger" "$home/schemas" \
        "$keda/config/crd/bases/keda.sh_scaledobjects.yaml" \
        "$crds/monitoring.coreos.com_servicemonitors.yaml" \
        "$crds/monitoring.coreos.com_podmonitors.yaml" \
        "$crds/monitoring.coreos.com_prometheusrules.yaml"
    for schema in deployment-apps-v1 scaledobject-keda-v1alpha1 prometheusrule-monitoring-v1; do
        [ -s "$home/schemas/$schema.json" ] || { echo "install-k8s-tools: $schema.json was not written" >&2; exit 1; }
    done
    printf 'helm %s\nkubeconform %s\nkubernetes %s\nkeda %s\nprometheus-operator %s\n' \
        "$helm_version" "$kubeconform_version" "$kubernetes_version" "$keda_version" "$prometheus_operator_version" \
        > "$home/installed"
fi
echo "$home"
