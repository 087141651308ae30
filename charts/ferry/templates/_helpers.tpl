{{- define "ferry.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ferry.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ferry.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "ferry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "ferry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ferry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "ferry.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ferry.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository[:tag][@digest]; the digest wins when set. */}}
{{- define "ferry.image" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "ferry.peeringName" -}}
{{- default (include "ferry.fullname" .) .Values.peering.name -}}
{{- end -}}

{{- define "ferry.peering" -}}
{{- if gt (int .Values.replicaCount) 1 -}}true{{- end -}}
{{- end -}}

{{- define "ferry.webhookService" -}}
{{- printf "%s-webhook" (include "ferry.fullname" .) -}}
{{- end -}}

{{- define "ferry.webhookHost" -}}
{{- printf "%s.%s.svc" (include "ferry.webhookService" .) .Release.Namespace -}}
{{- end -}}

{{/* The operator's username: the admission policy leaves its requests alone. */}}
{{- define "ferry.operatorUser" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "ferry.serviceAccountName" .) -}}
{{- end -}}

{{/* The MutatingWebhookConfiguration's name (kopf's webhook name: inject-agent.<it>). */}}
{{- define "ferry.webhookConfiguration" -}}{{ .Values.webhook.configurationName }}{{- end -}}

{{/* Namespaces Ferry serves (a JSON list): namespaced.namespaces and the namespaces of
agent.rbac.bindings; in the namespaced install also the release namespace (the
operator watches its canary Lease there). */}}
{{- define "ferry.servedNamespaces" -}}
{{- $ns := list -}}
{{- range .Values.namespaced.namespaces }}{{- $ns = append $ns . -}}{{- end -}}
{{- range .Values.agent.rbac.bindings }}{{- $ns = append $ns .namespace -}}{{- end -}}
{{- if .Values.namespaced.enabled }}{{- $ns = append $ns .Release.Namespace -}}{{- end -}}
{{- $ns | uniq | toJson -}}
{{- end -}}

{{/* What the operator watches, reads and writes: the ClusterRole's rules in cluster
mode, each served namespace's Role in the namespaced install. */}}
{{- define "ferry.operatorWatchRules" -}}
# kopf watches each kind and keeps its progress in ferry.dev annotations.
- apiGroups: [ferry.dev]
  resources: [weightsources, refitjobs, artifactcaches]
  verbs: [list, watch, patch]
# A RefitJob reconcile reads its source; a target's final report reconciles its job at once.
- apiGroups: [ferry.dev]
  resources: [weightsources, refitjobs]
  verbs: [get]
# Finished RefitJobs past ttlSecondsAfterFinished are deleted.
- apiGroups: [ferry.dev]
  resources: [refitjobs]
  verbs: [delete]
# Server-side apply of .status.
- apiGroups: [ferry.dev]
  resources: [weightsources/status, refitjobs/status, artifactcaches/status]
  verbs: [patch]
# Selectors resolve to pods; the agent signer reads the requesting pod.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, get]
# Agent liveness and reports (Leases), the canary coming back through a watch.
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [list, watch]
# kopf.event on condition transitions.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end -}}
