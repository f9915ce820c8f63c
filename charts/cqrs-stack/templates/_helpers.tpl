{{/*
Expand the name of the chart.
*/}}
{{- define "cqrs-stack.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "cqrs-stack.fullname" -}}
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

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "cqrs-stack.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "cqrs-stack.labels" -}}
helm.sh/chart: {{ include "cqrs-stack.chart" . }}
{{ include "cqrs-stack.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels
*/}}
{{- define "cqrs-stack.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cqrs-stack.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The name of the operator's ServiceAccount.
*/}}
{{- define "cqrs-stack.operatorServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-operator" (include "cqrs-stack.fullname" .)) .Values.serviceAccount.name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The operator's own namespace (default "<release namespace>-operator"): deleting the stacks'
namespace must not delete the operator before it has run their finalizers.
*/}}
{{- define "cqrs-stack.operatorNamespace" -}}
{{- .Values.operator.namespace | default (printf "%s-operator" .Release.Namespace | trunc 63 | trimSuffix "-") }}
{{- end }}

{{/*
The namespaces the operator watches (a list; the release namespace when none are given).
*/}}
{{- define "cqrs-stack.watchNamespaces" -}}
{{- $namespaces := .Values.operator.watchNamespaces | default (list .Release.Namespace) }}
{{- toJson $namespaces }}
{{- end }}

{{/*
Labels of one component: the common labels plus component and part-of.
Call with (dict "ctx" $ "component" "operator").
*/}}
{{- define "cqrs-stack.componentLabels" -}}
{{ include "cqrs-stack.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: cqrs-stack
{{- end }}

{{/*
Selector labels of one component (immutable: never add to them).
Call with (dict "ctx" $ "component" "operator").
*/}}
{{- define "cqrs-stack.componentSelectorLabels" -}}
{{ include "cqrs-stack.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Object names.
*/}}
{{- define "cqrs-stack.operatorName" -}}
{{- printf "%s-operator" (include "cqrs-stack.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- /* Cluster-scoped, so named after the release's namespace too: unique per release. */ -}}
{{- define "cqrs-stack.operatorFinalizeName" -}}
{{- printf "%s-%s-operator-finalize" .Release.Namespace (include "cqrs-stack.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cqrs-stack.postgresqlName" -}}
{{- printf "%s-postgresql" (include "cqrs-stack.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cqrs-stack.redisName" -}}
{{- printf "%s-redis" (include "cqrs-stack.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's CqrsStack name (default: the release name, so release "orders" serves
"orders-write-api" and "orders-read-api"). The operator names its children
"<stack>-credentials" (the longest suffix, 12 characters), so the name is kept to 50.
*/}}
{{- define "cqrs-stack.stackName" -}}
{{- default .Release.Name .Values.stack.name | trunc 50 | trimSuffix "-" }}
{{- end }}

{{/*
Image references: "<repository>:<tag>", the tag defaulting to the chart's appVersion.
Call with (dict "image" .Values.operator.image "ctx" $).
*/}}
{{- define "cqrs-stack.image" -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .ctx.Chart.AppVersion | toString) }}
{{- end }}

{{/*
The stack's database endpoints: the values, or the dev PostgreSQL for what is left empty.
Call with (dict "db" .Values.stack.databases.write "ctx" $); renders a YAML mapping.
*/}}
{{- define "cqrs-stack.stackDatabase" -}}
{{- $ctx := .ctx }}
{{- $dev := $ctx.Values.devDatabases.enabled }}
{{- $host := .db.host }}
{{- if and (not $host) $dev }}
{{- $host = printf "%s.%s.svc" (include "cqrs-stack.postgresqlName" $ctx) $ctx.Release.Namespace }}
{{- end }}
{{- $secret := .db.adminSecret }}
{{- if and (not $secret) $dev }}
{{- $secret = include "cqrs-stack.postgresqlName" $ctx }}
{{- end }}
host: {{ required (printf "stack.databases.%s.host is required when devDatabases.enabled is false" .which) $host | quote }}
port: {{ .db.port }}
adminSecret: {{ required (printf "stack.databases.%s.adminSecret is required when devDatabases.enabled is false" .which) $secret | quote }}
{{- with .db.database }}
database: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
The stack's Redis: the URL, a Secret key, or the dev Redis's generated URL Secret.
*/}}
{{- define "cqrs-stack.stackRedis" -}}
{{- $redis := .Values.stack.redis }}
{{- if and $redis.url $redis.urlSecret.name }}
{{- fail "stack.redis: set url or urlSecret.name, not both" }}
{{- else if $redis.url }}
url: {{ $redis.url | quote }}
{{- else if $redis.urlSecret.name }}
urlSecret:
  name: {{ $redis.urlSecret.name | quote }}
  key: {{ required "stack.redis.urlSecret.key is required with urlSecret.name" $redis.urlSecret.key | quote }}
{{- else if .Values.devDatabases.enabled }}
urlSecret:
  name: {{ include "cqrs-stack.redisName" . | quote }}
  key: url
{{- else }}
{{- fail "stack.redis.url or stack.redis.urlSecret is required when devDatabases.enabled is false" }}
{{- end }}
{{- end }}

{{/*
A password kept across upgrades: the one already in Secret .name (key .key) when the release
is upgraded, else a new random one. `helm template` (no cluster) always generates a new one.
Call with (dict "ctx" $ "name" "<secret>" "key" "password").
*/}}
{{- define "cqrs-stack.generatedPassword" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .name }}
{{- if and $existing $existing.data (hasKey $existing.data .key) }}
{{- index $existing.data .key | b64dec }}
{{- else }}
{{- randAlphaNum 32 }}
{{- end }}
{{- end }}

{{/*
The pod-level security context shared by every pod of the chart: non-root, RuntimeDefault
seccomp. Call with the uid.
*/}}
{{- define "cqrs-stack.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ . }}
runAsGroup: {{ . }}
fsGroup: {{ . }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
The container security context shared by every container of the chart.
*/}}
{{- define "cqrs-stack.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}
