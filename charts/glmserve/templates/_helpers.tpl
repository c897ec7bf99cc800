{{/* Chart name, overridable. */}}
{{- define "glmserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: RELEASE-CHART, or RELEASE when it already contains the chart name; max 63 chars. */}}
{{- define "glmserve.fullname" -}}
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

{{- define "glmserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object of the chart carries (add app.kubernetes.io/component per object). */}}
{{- define "glmserve.commonLabels" -}}
helm.sh/chart: {{ include "glmserve.chart" . }}
app.kubernetes.io/name: {{ include "glmserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: glmserve
{{- end }}

{{/* Labels of the operator's own objects. */}}
{{- define "glmserve.labels" -}}
{{ include "glmserve.commonLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The immutable subset used by selectors. */}}
{{- define "glmserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "glmserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "glmserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "glmserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "glmserve.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) }}
{{- end }}

{{/* Whether the operator watches every namespace (ClusterRole) or one (Role). */}}
{{- define "glmserve.clusterWide" -}}
{{- if .Values.operator.watchNamespace }}false{{ else }}true{{ end }}
{{- end }}

{{/*
A monitoring object is rendered when its flag is true, or when it is "auto" and the cluster serves its API.
Call with (dict "flag" .Values.x.enabled "api" "monitoring.coreos.com/v1/PrometheusRule" "ctx" $).
*/}}
{{- define "glmserve.monitoringOn" -}}
{{- $flag := toString .flag }}
{{- if or (eq $flag "true") (and (eq $flag "auto") (.ctx.Capabilities.APIVersions.Has .api)) }}true{{ end }}
{{- end }}
