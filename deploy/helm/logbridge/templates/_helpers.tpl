{{/* Names and labels. */}}
{{- define "logbridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "logbridge.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "logbridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "logbridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "logbridge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "logbridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "logbridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "logbridge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The configuration as TOML. A string is taken whole; a mapping is written key by key, because
Helm's toToml writes every number as a float (values are read through JSON), which logbridge
rightly refuses for a capacity. Scalars and lists of scalars are written with toJson, whose
strings, numbers (an integral value without a fraction) and booleans are TOML too.
*/}}
{{- define "logbridge.config" -}}
{{- if kindIs "string" .Values.config }}
{{- .Values.config }}
{{- else }}
{{- include "logbridge.tomlTable" (dict "path" "" "table" .Values.config) }}
{{- end }}
{{- end }}

{{/* A TOML key: bare when it can be, else quoted ("auto.offset.reset"). */}}
{{- define "logbridge.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/* One table: its plain keys first (TOML puts them before any sub-table), then each
sub-table as [path.key] and each list of tables as [[path.key]]. Null values are left out. */}}
{{- define "logbridge.tomlTable" -}}
{{- $path := .path }}
{{- $table := .table }}
{{- range $key, $value := $table }}
{{- if not (or (kindIs "map" $value) (kindIs "invalid" $value) (include "logbridge.isTableList" $value)) }}
{{ include "logbridge.tomlKey" $key }} = {{ toJson $value }}
{{- end }}
{{- end }}
{{- range $key, $value := $table }}
{{- $sub := include "logbridge.tomlKey" $key }}
{{- if $path }}{{ $sub = printf "%s.%s" $path $sub }}{{ end }}
{{- if kindIs "map" $value }}

[{{ $sub }}]
{{- include "logbridge.tomlTable" (dict "path" $sub "table" $value) }}
{{- else if include "logbridge.isTableList" $value }}
{{- range $item := $value }}

[[{{ $sub }}]]
{{- include "logbridge.tomlTable" (dict "path" $sub "table" $item) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* "true" for a non-empty list whose items are all mappings, else "". */}}
{{- define "logbridge.isTableList" -}}
{{- if and (kindIs "slice" .) (gt (len .) 0) }}
{{- $all := true }}
{{- range . }}{{ if not (kindIs "map" .) }}{{ $all = false }}{{ end }}{{ end }}
{{- if $all }}true{{ end }}
{{- end }}
{{- end }}

{{/* A key of the config mapping, or "" when config is a string or lacks it. */}}
{{- define "logbridge.configValue" -}}
{{- $node := .root.Values.config }}
{{- range $key := .keys }}
{{- if kindIs "map" $node }}{{ $node = get $node $key }}{{ else }}{{ $node = "" }}{{ end }}
{{- end }}
{{- if kindIs "slice" $node }}{{ join "," $node }}{{ else if kindIs "string" $node }}{{ $node }}{{ else if not (kindIs "invalid" $node) }}{{ toJson $node }}{{ end }}
{{- end }}

{{/* The runbook's base URL: the value, or this release's Service. */}}
{{- define "logbridge.runbookBaseUrl" -}}
{{- if .Values.monitoring.runbookBaseUrl }}
{{- .Values.monitoring.runbookBaseUrl }}
{{- else }}
{{- printf "http://%s.%s.svc:%d/runbook" (include "logbridge.fullname" .) .Release.Namespace (int .Values.port) }}
{{- end }}
{{- end }}

{{/*
Checks across values that a schema cannot state; each fails rendering with the key and the fix.
*/}}
{{- define "logbridge.checks" -}}
{{- $partitions := .Values.partitions }}
{{- if .Values.keda.enabled }}
{{- if kindIs "invalid" $partitions }}
{{- fail "keda.enabled needs partitions: the partition count of the consumed topic (with several, the largest), so that scaling never passes it" }}
{{- end }}
{{- if gt (int .Values.keda.maxReplicas) (int $partitions) }}
{{- fail (printf "keda.maxReplicas (%d) is more than partitions (%d): a consumer group member beyond the partition count owns no partition and idles; lower keda.maxReplicas or add partitions to the topic" (int .Values.keda.maxReplicas) (int $partitions)) }}
{{- end }}
{{- if gt (int .Values.keda.minReplicas) (int .Values.keda.maxReplicas) }}
{{- fail (printf "keda.minReplicas (%d) is more than keda.maxReplicas (%d)" (int .Values.keda.minReplicas) (int .Values.keda.maxReplicas)) }}
{{- end }}
{{- else if and (not (kindIs "invalid" $partitions)) (gt (int .Values.replicas) (int $partitions)) }}
{{- fail (printf "replicas (%d) is more than partitions (%d): a consumer group member beyond the partition count owns no partition and idles; lower replicas or add partitions to the topic" (int .Values.replicas) (int $partitions)) }}
{{- end }}
{{- $drainMs := include "logbridge.configValue" (dict "root" . "keys" (list "pipeline" "drain_timeout_ms")) | default "5000" }}
{{- if le (mul (int .Values.terminationGracePeriodSeconds) 1000) (int64 $drainMs) }}
{{- fail (printf "terminationGracePeriodSeconds (%d s) must be longer than config.pipeline.drain_timeout_ms (%s ms): the pod is killed before SIGTERM's drain and final commit finish" (int .Values.terminationGracePeriodSeconds) $drainMs) }}
{{- end }}
{{- if not (kindIs "string" .Values.config) }}
{{- if not (include "logbridge.configValue" (dict "root" . "keys" (list "kafka" "brokers"))) }}
{{- fail "config.kafka.brokers is required: the Kafka bootstrap servers, e.g. --set config.kafka.brokers=kafka:9092" }}
{{- end }}
{{- $listen := include "logbridge.configValue" (dict "root" . "keys" (list "http" "listen")) }}
{{- if and $listen (not (hasSuffix (printf ":%d" (int .Values.port)) $listen)) }}
{{- fail (printf "config.http.listen (%s) is not on port (%d): the probes, the Service and the scrape use port" $listen (int .Values.port)) }}
{{- end }}
{{- end }}
{{- if .Values.keda.enabled }}
{{- range $key, $keys := dict "keda.bootstrapServers" (list "bootstrapServers" "kafka" "brokers") "keda.consumerGroup" (list "consumerGroup" "kafka" "group_id") "keda.topics" (list "topics" "kafka" "topics") }}
{{- if not (or (get $.Values.keda (first $keys)) (include "logbridge.configValue" (dict "root" $ "keys" (rest $keys)))) }}
{{- fail (printf "keda.enabled needs %s (or config.%s)" $key (join "." (rest $keys))) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
