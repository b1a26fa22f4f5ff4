{{/* The chart's name, or nameOverride. */}}
{{- define "quantum-trader.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the base of every object name (fullnameOverride wins). */}}
{{- define "quantum-trader.fullname" -}}
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

{{- define "quantum-trader.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels selectors use: stable across upgrades. */}}
{{- define "quantum-trader.selectorLabels" -}}
app.kubernetes.io/name: {{ include "quantum-trader.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every object the chart renders. */}}
{{- define "quantum-trader.labels" -}}
helm.sh/chart: {{ include "quantum-trader.chart" . }}
{{ include "quantum-trader.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: quantum-trader
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The operator's selector labels. */}}
{{- define "quantum-trader.operatorSelectorLabels" -}}
{{ include "quantum-trader.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "quantum-trader.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-operator" (include "quantum-trader.fullname" .)) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, the tag defaulting to the appVersion. */}}
{{- define "quantum-trader.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* The NATS URL used when no Secret holds it: an existing server (the chart deploys none). */}}
{{- define "quantum-trader.natsUrl" -}}
{{- .Values.externalNats.url }}
{{- end }}

{{/* The NATS port the NetworkPolicies open. */}}
{{- define "quantum-trader.natsPort" -}}
{{- .Values.externalNats.port }}
{{- end }}

{{/* Labels of the pods the operator creates for one TradingPolicy's workloads. */}}
{{- define "quantum-trader.workloadSelector" -}}
app.kubernetes.io/part-of: quantum-trader
app.kubernetes.io/managed-by: qtrader-operator
{{- end }}

{{/* The policies whose workloads get Services (explicit list + the default policy). */}}
{{- define "quantum-trader.servicePolicies" -}}
{{- $names := .Values.workloads.services.policies }}
{{- if .Values.tradingPolicy.create }}
{{- $names = append $names .Values.tradingPolicy.name }}
{{- end }}
{{- toJson (uniq $names) }}
{{- end }}

{{/* The restricted pod security context (Pod Security Standard "restricted"). */}}
{{- define "quantum-trader.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "quantum-trader.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end }}

{{/* NetworkPolicy egress rule: the cluster DNS. */}}
{{- define "quantum-trader.dnsEgress" -}}
- to:
    - namespaceSelector:
        matchLabels:
          {{- toYaml .Values.networkPolicy.dns.namespaceSelector | nindent 10 }}
      podSelector:
        matchLabels:
          {{- toYaml .Values.networkPolicy.dns.podSelector | nindent 10 }}
  ports:
    - {protocol: UDP, port: 53}
    - {protocol: TCP, port: 53}
{{- end }}
{{/* NetworkPolicy ingress rule: the health port from the namespace and healthFrom. */}}
{{- define "quantum-trader.healthIngress" -}}
- from:
    - podSelector: {}
    {{- with .root.Values.networkPolicy.healthFrom }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - {protocol: TCP, port: {{ .port }}}
{{- end }}
