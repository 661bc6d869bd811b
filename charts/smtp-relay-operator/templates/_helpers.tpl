{{/* Chart name, at most 63 characters. */}}
{{- define "smtp-relay-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name for the objects this chart creates. */}}
{{- define "smtp-relay-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "smtp-relay-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "smtp-relay-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "smtp-relay-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "smtp-relay-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: smtp-relay
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "smtp-relay-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "smtp-relay-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "smtp-relay-operator.peering" -}}
{{- default (include "smtp-relay-operator.fullname" .) .Values.peering.name }}
{{- end }}
