{{/* Names, labels and the rendered exporter config shared by the templates. */}}

{{- define "a3mailer-exporter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "a3mailer-exporter.fullname" -}}
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

{{- define "a3mailer-exporter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "a3mailer-exporter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "a3mailer-exporter.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "a3mailer-exporter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: a3mailer
{{- end }}

{{- define "a3mailer-exporter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "a3mailer-exporter.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "a3mailer-exporter.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The port of a HOST:PORT address. */}}
{{- define "a3mailer-exporter.portOf" -}}
{{- splitList ":" . | last | int }}
{{- end }}

{{- define "a3mailer-exporter.httpPort" -}}
{{- include "a3mailer-exporter.portOf" .Values.config.server.listen_address }}
{{- end }}

{{- define "a3mailer-exporter.scheme" -}}
{{- if .Values.config.server.tls.cert_file }}https{{ else }}http{{ end }}
{{- end }}

{{- /* A kubelet probe of `path`: an HTTP(S) GET, or with mutual TLS (client_ca_file) a TCP
connect, as kubelet has no client certificate to show and the handshake would fail. */}}
{{- define "a3mailer-exporter.probe" -}}
{{- $root := index . 0 }}
{{- if $root.Values.config.server.tls.client_ca_file }}
tcpSocket: {port: http}
{{- else }}
httpGet: {path: {{ index . 1 }}, port: http, scheme: {{ include "a3mailer-exporter.scheme" $root | upper }}}
{{- end }}
{{- end }}

{{- define "a3mailer-exporter.postfixPolicy" -}}
{{- if and .Values.config.security.enabled .Values.config.security.postfix_policy.enabled }}true{{ end }}
{{- end }}

{{/* Where the pod mounts what. */}}
{{- define "a3mailer-exporter.configDir" -}}/etc/a3mailer-exporter/config{{- end }}
{{- define "a3mailer-exporter.secretsDir" -}}/etc/a3mailer-exporter/secrets{{- end }}
{{- define "a3mailer-exporter.redisSecretDir" -}}/etc/a3mailer-exporter/redis{{- end }}

{{/* Dotted paths of every key under .Values.secrets (one a line), e.g. security.admin_token. */}}
{{- define "a3mailer-exporter.secretPaths" -}}
{{- range $key, $value := .node }}
{{- $path := ternary $key (printf "%s.%s" $.prefix $key) (eq $.prefix "") }}
{{- if kindIs "map" $value }}
{{- include "a3mailer-exporter.secretPaths" (dict "node" $value "prefix" $path) }}
{{- else if not (has $path (list "existingSecret" "existingSecretKeys")) }}
{{ $path }}
{{- end }}
{{- end }}
{{- end }}

{{/* The chart Secret's data: {dotted path: value} for every secret value that is set. */}}
{{- define "a3mailer-exporter.secretData" -}}
{{- $data := dict }}
{{- range $path := include "a3mailer-exporter.secretPaths" (dict "node" .Values.secrets "prefix" "") | trim | splitList "\n" }}
{{- $value := $.Values.secrets }}
{{- range $part := splitList "." $path }}
{{- $value = get $value $part }}
{{- end }}
{{- if $value }}
{{- $_ := set $data $path (toString $value) }}
{{- end }}
{{- end }}
{{- toYaml $data }}
{{- end }}

{{/* Keys of the mounted secrets Secret (the chart's, or existingSecretKeys). */}}
{{- define "a3mailer-exporter.secretKeys" -}}
{{- if .Values.secrets.existingSecret }}
{{- toYaml .Values.secrets.existingSecretKeys }}
{{- else }}
{{- include "a3mailer-exporter.secretData" . | fromYaml | keys | sortAlpha | toYaml }}
{{- end }}
{{- end }}

{{- define "a3mailer-exporter.secretName" -}}
{{- default (printf "%s-secrets" (include "a3mailer-exporter.fullname" .)) .Values.secrets.existingSecret }}
{{- end }}

{{- define "a3mailer-exporter.redisEnabled" -}}
{{- if or .Values.redis.url (eq .Values.config.security.store.type "redis") }}true{{ end }}
{{- end }}

{{/* Sets .value at the dotted .path inside the map .root, creating maps on the way. */}}
{{- define "a3mailer-exporter.setPath" -}}
{{- $node := .root }}
{{- $parts := splitList "." .path }}
{{- range $part := initial $parts }}
{{- if not (kindIs "map" (get $node $part)) }}
{{- $_ := set $node $part dict }}
{{- end }}
{{- $node = get $node $part }}
{{- end }}
{{- $_ := set $node (last $parts) .value }}
{{- end }}

{{/* Fails with a clear message on values the chart cannot run with. */}}
{{- define "a3mailer-exporter.validate" -}}
{{- if and (gt (int .Values.replicas) 1) .Values.config.security.enabled (not (include "a3mailer-exporter.redisEnabled" .)) }}
{{- fail (printf "replicas: %d needs a shared security store, or each pod would keep its own lockouts and bans: set redis.url to an external Redis (password in secrets.security.store.redis_password or redis.existingSecret), or run replicas: 1" (int .Values.replicas)) }}
{{- end }}
{{- $security := .Values.config.security }}
{{- $present := include "a3mailer-exporter.secretKeys" . | fromYamlArray }}
{{- range $env := .Values.extraEnv }}{{ $present = append $present $env.name }}{{ end }}
{{- $missing := list }}
{{- range $shared := list (list $security.mfa.enabled "security.mfa.encryption_key" $security.mfa.encryption_key_env) (list $security.enable_csrf_protection "security.csrf_key" $security.csrf_key_env) }}
{{- if and (index $shared 0) (not (has (index $shared 1) $present)) (not (has (index $shared 2) $present)) }}
{{- $missing = append $missing (printf "secrets.%s (or an extraEnv entry %s)" (index $shared 1) (index $shared 2)) }}
{{- end }}
{{- end }}
{{- if and (gt (int .Values.replicas) 1) $security.enabled $missing }}
{{- fail (printf "replicas: %d needs the keys every pod must share, or each pod would generate its own and could not read the others' MFA secrets or CSRF tokens: set %s" (int .Values.replicas) (join ", " $missing)) }}
{{- end }}
{{- range $key := include "a3mailer-exporter.secretKeys" . | fromYamlArray }}
{{- if not (has $key (include "a3mailer-exporter.secretPaths" (dict "node" $.Values.secrets "prefix" "") | trim | splitList "\n")) }}
{{- fail (printf "secrets.existingSecretKeys: %s is not a secret the exporter reads" $key) }}
{{- end }}
{{- end }}
{{- $alertNames := list }}
{{- range $group := (.Files.Get "files/rules.yaml" | fromYaml).groups }}
{{- range $rule := $group.rules }}{{ if $rule.alert }}{{ $alertNames = append $alertNames $rule.alert }}{{ end }}{{ end }}
{{- end }}
{{- range $name := concat (keys .Values.config.alerting.alerts) .Values.prometheusRule.disabled }}
{{- if not (has $name $alertNames) }}
{{- fail (printf "%s is not an alert of the chart (config.alerting.alerts, prometheusRule.disabled): see alert-rules/alerts.yaml" $name) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The exporter config (YAML): .Values.config with the mounted secret files and Redis. */}}
{{- define "a3mailer-exporter.config" -}}
{{- $config := deepCopy .Values.config }}
{{- $dir := include "a3mailer-exporter.secretsDir" . }}
{{- range $key := include "a3mailer-exporter.secretKeys" . | fromYamlArray }}
{{- include "a3mailer-exporter.setPath" (dict "root" $config "path" (printf "%s_file" $key) "value" (printf "%s/%s" $dir $key)) }}
{{- end }}
{{- if .Values.redis.url }}
{{- include "a3mailer-exporter.setPath" (dict "root" $config "path" "security.store.type" "value" "redis") }}
{{- include "a3mailer-exporter.setPath" (dict "root" $config "path" "security.store.redis_url" "value" .Values.redis.url) }}
{{- end }}
{{- if .Values.redis.existingSecret }}
{{- include "a3mailer-exporter.setPath" (dict "root" $config "path" "security.store.redis_password_file" "value" (printf "%s/password" (include "a3mailer-exporter.redisSecretDir" .))) }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* Whether the state dir lives on a PVC. */}}
{{- define "a3mailer-exporter.pvc" -}}
{{- if and .Values.persistence.enabled (le (int .Values.replicas) 1) }}true{{ end }}
{{- end }}
