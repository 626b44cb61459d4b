{{/* Names and labels shared by the templates. */}}
{{- define "infergate.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "infergate.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "infergate.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* More than one gateway node needs PostgreSQL state and a shared spool. */}}
{{- define "infergate.checkNodes" -}}
{{- if gt (int .Values.gateway.replicas) 1 -}}
{{- if not .Values.database.url -}}
{{- fail "gateway.replicas > 1 needs database.url: several nodes share PostgreSQL state" -}}
{{- end -}}
{{- if not .Values.gateway.persistence.sharedClaim -}}
{{- fail "gateway.replicas > 1 needs gateway.persistence.sharedClaim: a ReadWriteMany claim for the spool the nodes share" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Infergate's settings: the chart's own under the user's config. */}}
{{- define "infergate.settings" -}}
{{- $ours := dict
  "ingest" (dict "host" "0.0.0.0" "port" (int .Values.service.dicomPort))
  "storage" (dict "var_dir" "/var/lib/infergate")
  "ops" (dict "host" "0.0.0.0" "port" 9111)
  "triton" (dict "mode" "remote" "url" (printf "%s-triton:8001" (include "infergate.fullname" .)))
-}}
{{- if .Values.database.url -}}
{{- $_ := set $ours.storage "database_url" .Values.database.url -}}
{{- end -}}
{{- if .Values.secrets.tls -}}
{{- $_ := set $ours.ingest "tls" (dict
  "port" (int .Values.service.tlsPort)
  "certificate" "/etc/infergate/tls/tls.crt"
  "private_key" "/etc/infergate/tls/tls.key"
  "client_ca" "/etc/infergate/tls/ca.crt") -}}
{{- end -}}
{{- toYaml (mergeOverwrite (deepCopy .Values.config) $ours) -}}
{{- end -}}
