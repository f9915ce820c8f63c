{{/*
Monitoring helpers. Each Prometheus Operator object (PodMonitor, ServiceMonitor,
PrometheusRule) is rendered only where the cluster serves its kind: a cluster may serve the
monitoring.coreos.com/v1 API with only some of the CRDs installed. NOTES.txt names each one
skipped.
*/}}
{{- define "cqrs-stack.monitoringApi" -}}
monitoring.coreos.com/v1
{{- end }}

{{/*
"true" where the cluster serves the monitoring kind .kind. Call with (dict "ctx" $ "kind" "PodMonitor").
*/}}
{{- define "cqrs-stack.servesMonitor" -}}
{{- if .ctx.Capabilities.APIVersions.Has (printf "%s/%s" (include "cqrs-stack.monitoringApi" .ctx) .kind) }}true{{ end }}
{{- end }}

{{/*
The monitoring objects enabled in values but skipped for want of their kind, as a JSON list.
*/}}
{{- define "cqrs-stack.skippedMonitors" -}}
{{- $skipped := list }}
{{- range $key, $kind := dict "podMonitor" "PodMonitor" "serviceMonitor" "ServiceMonitor" "prometheusRule" "PrometheusRule" }}
{{- if and (index $.Values.monitoring $key).enabled (not (include "cqrs-stack.servesMonitor" (dict "ctx" $ "kind" $kind))) }}
{{- $skipped = append $skipped (printf "%s (monitoring.%s.enabled)" $kind $key) }}
{{- end }}
{{- end }}
{{- toJson $skipped }}
{{- end }}

{{/*
The operator's pods are scraped by the ServiceMonitor when it is rendered, else by the
PodMonitor: never both (the operator's series would be counted twice).
*/}}
{{- define "cqrs-stack.podMonitorScrapesOperator" -}}
{{- if not (and .Values.monitoring.serviceMonitor.enabled (include "cqrs-stack.servesMonitor" (dict "ctx" . "kind" "ServiceMonitor"))) }}true{{ end }}
{{- end }}

{{/*
A monitoring object's labels: the chart's standard labels merged with the extra ones of
values (.extra). The chart's win on a shared key (the selectors and Helm's ownership rely on
them). Call with (dict "ctx" $ "component" "monitoring" "extra" .Values.monitoring.podMonitor.labels).
*/}}
{{- define "cqrs-stack.monitoringLabels" -}}
{{- $chart := include "cqrs-stack.componentLabels" (dict "ctx" .ctx "component" .component) | fromYaml }}
{{- toYaml (merge $chart (.extra | default dict)) }}
{{- end }}

{{/*
An alert's labels: its severity (the alert's own value) merged with alertLabels; the
severity of the alert's values wins over an alertLabels.severity. Call with
(dict "severity" $rule.projectionLag.severity "extra" $rule.alertLabels).
*/}}
{{- define "cqrs-stack.alertLabels" -}}
{{- toYaml (merge (dict "severity" .severity) (.extra | default dict)) }}
{{- end }}

{{/*
The namespaces whose pods the PodMonitor scrapes: the watched ones and the operator's, as a
namespaceSelector (any namespace with rbac.clusterWide).
*/}}
{{- define "cqrs-stack.monitorNamespaceSelector" -}}
{{- if .Values.rbac.clusterWide }}
any: true
{{- else }}
{{- $names := include "cqrs-stack.watchNamespaces" . | fromJsonArray }}
{{- $names = append $names (include "cqrs-stack.operatorNamespace" .) | uniq }}
matchNames:
  {{- toYaml $names | nindent 2 }}
{{- end }}
{{- end }}
