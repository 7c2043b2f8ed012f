{{/* Filling the generated rules and dashboards (files/) with the release's values. */}}

{{/* A number as the generator writes it: 80, not 80.0 or 8e+01. */}}
{{- define "a3mailer-exporter.number" -}}
{{- if eq (float64 (int64 .)) (float64 .) }}{{ int64 . }}{{ else }}{{ float64 . }}{{ end }}
{{- end }}

{{/* .text with every <<value:PATH>> replaced by the number at .Values.config.PATH
     (quoted forms "<<value:PATH>>" too, for JSON), <<sel>> by .sel and <<for>> by .for. */}}
{{- define "a3mailer-exporter.fill" -}}
{{- $text := .text }}
{{- range $token := regexFindAll "<<value:[A-Za-z0-9_.]+>>" $text -1 | uniq }}
{{- $value := $.root.Values.config }}
{{- range $part := splitList "." (trimSuffix ">>" (trimPrefix "<<value:" $token)) }}
{{- $value = get $value $part }}
{{- end }}
{{- $number := include "a3mailer-exporter.number" $value }}
{{- $text = replace (printf "%q" $token) $number $text | replace $token $number }}
{{- end }}
{{- $text = replace "<<sel>>" .sel $text }}
{{- if hasKey . "for" }}
{{- $text = replace "<<for>>" .for $text }}
{{- end }}
{{- $text }}
{{- end }}

{{/* The selector as it stands inside a JSON string. */}}
{{- define "a3mailer-exporter.jsonSelector" -}}
{{- $json := toJson .Values.config.alerting.selector }}
{{- substr 1 (int (sub (len $json) 1)) $json }}
{{- end }}
