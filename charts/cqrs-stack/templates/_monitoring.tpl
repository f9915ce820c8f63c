{{/*
Monitoring helpers. The Prometheus Operator's objects (PodMonitor, ServiceMonitor,
PrometheusRule) are rendered only where the cluster serves their API; NOTES.txt names what
was skipped.
*/}}
{{- define "cqrs-stack.monitoringApi" -}}
monitoring.coreos.com/v1
{{- end }}

{{- define "cqrs-stack.hasMonitoringApi" -}}
{{- if .Capabilities.APIVersions.Has (include "cqrs-stack.monitoringApi" .) }}true{{ end }}
{{- end }}

{{/*
The monitoring objects enabled in values but skipped for want of the API, as a JSON list.
*/}}
{{- define "cqrs-stack.skippedMonitors" -}}
{{- $skipped := list }}
{{- if not (include "cqrs-stack.hasMonitoringApi" .) }}
{{- range $key, $kind := dict "podMonitor" "PodMonitor" "serviceMonitor" "ServiceMonitor" "prometheusRule" "PrometheusRule" }}
{{- if (index $.Values.monitoring $key).enabled }}
{{- $skipped = append $skipped (printf "%s (monitoring.%s.enabled)" $kind $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson $skipped }}
{{- end }}

{{/*
The operator's pods are scraped by the ServiceMonitor when it is on, else by the PodMonitor:
never both (the operator's series would be counted twice).
*/}}
{{- define "cqrs-stack.podMonitorScrapesOperator" -}}
{{- if not (and .Values.monitoring.serviceMonitor.enabled (include "cqrs-stack.hasMonitoringApi" .)) }}true{{ end }}
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
