{{/* The scrape settings ServiceMonitor endpoints and PodMonitor podMetricsEndpoints share;
     called with (dict "monitor" .Values.serviceMonitor "root" $). */}}
{{- define "a3mailer-exporter.scrapeEndpoint" -}}
{{- $m := .monitor -}}
- port: http
  path: /metrics
  scheme: {{ include "a3mailer-exporter.scheme" .root }}
  interval: {{ $m.interval }}
  scrapeTimeout: {{ $m.scrapeTimeout }}
  honorLabels: {{ $m.honorLabels }}
  relabelings:
    - action: replace
      targetLabel: job
      replacement: {{ $m.job | quote }}
    {{- with $m.relabelings }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $m.metricRelabelings }}
  metricRelabelings:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $m.tlsConfig }}
  tlsConfig:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $m.authorization }}
  authorization:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $m.basicAuth }}
  basicAuth:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* Spec-level scrape limits; a limit of 0 is left out. */}}
{{- define "a3mailer-exporter.scrapeLimits" -}}
{{- range $key := list "sampleLimit" "targetLimit" "labelLimit" "labelNameLengthLimit" "labelValueLengthLimit" }}
{{- $value := int (get $.monitor $key) }}
{{- if gt $value 0 }}
{{ $key }}: {{ $value }}
{{- end }}
{{- end }}
{{- end }}

{{/* metadata for a monitor or rule object: name, namespace, labels, annotations. */}}
{{- define "a3mailer-exporter.monitorMetadata" -}}
name: {{ include "a3mailer-exporter.fullname" .root }}
namespace: {{ .root.Release.Namespace }}
labels:
  {{- include "a3mailer-exporter.labels" .root | nindent 2 }}
  {{- with .monitor.labels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .monitor.annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
