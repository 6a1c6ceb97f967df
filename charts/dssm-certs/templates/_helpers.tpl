{{/* The dSSM namespace: dssmNamespace, else the release namespace. */}}
{{- define "dssm-certs.namespace" -}}
{{- default .Release.Namespace .Values.dssmNamespace -}}
{{- end -}}

{{/* Labels Helm adds on top of the kustomize manifests' own (pod templates keep only those). */}}
{{- define "dssm-certs.helmLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "dssm-certs.labels" -}}
app.kubernetes.io/name: dssm-certs
{{ include "dssm-certs.helmLabels" . }}
{{- end -}}

{{- define "dssm-certs.agentLabels" -}}
app.kubernetes.io/name: dssm-certs
app.kubernetes.io/component: agent
{{ include "dssm-certs.helmLabels" . }}
{{- end -}}

{{/* repository@digest when a digest is set (pinned), else repository:tag. */}}
{{- define "dssm-certs.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The targets with their namespace resolved, as a JSON list. */}}
{{- define "dssm-certs.targets" -}}
{{- $ns := include "dssm-certs.namespace" . -}}
{{- $out := list -}}
{{- range .Values.tmm.targets -}}
{{- $out = append $out (dict "namespace" (default $ns .namespace) "kind" .kind "name" .name) -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* The environment every dssm-certs container gets (flags are read from DSSM_CERTS_*). One
Deployment is passed as the --tmm-namespace/--tmm-deployment shorthand (what the kustomize
overlays set); several targets, or a DaemonSet, as DSSM_CERTS_TMM (NAMESPACE/KIND/NAME,...). */}}
{{- define "dssm-certs.env" -}}
{{- $targets := include "dssm-certs.targets" . | fromJsonArray -}}
{{- $first := first $targets -}}
{{- $one := and (eq (len $targets) 1) (eq $first.kind "Deployment") -}}
- name: DSSM_CERTS_DSSM_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- if $one }}
- name: DSSM_CERTS_TMM_DEPLOYMENT
  value: {{ $first.name | quote }}
{{- end }}
- name: DSSM_CERTS_STRATEGY
  value: {{ .Values.restartStrategy | quote }}
{{- if $one }}
- name: DSSM_CERTS_TMM_NAMESPACE
  value: {{ $first.namespace | quote }}
{{- else }}
{{- $list := list -}}
{{- range $targets -}}
{{- $list = append $list (printf "%s/%s/%s" .namespace (lower .kind) .name) -}}
{{- end }}
- name: DSSM_CERTS_TMM
  value: {{ join "," $list | quote }}
{{- end }}
{{- end -}}

{{- define "dssm-certs.jobPod" -}}
{{- $ctx := index . 0 -}}
{{- $args := index . 1 -}}
metadata:
  labels:
    app.kubernetes.io/name: dssm-certs
spec:
  serviceAccountName: dssm-certs
  restartPolicy: Never
  # On SIGTERM the holder finishes or rolls back its step (TMM back to its count).
  terminationGracePeriodSeconds: 120
  {{- with $ctx.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $ctx.Values.podSecurityContext | nindent 4 }}
  containers:
    - name: dssm-certs
      image: {{ include "dssm-certs.image" $ctx | quote }}
      imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
      args: {{ toJson $args }}
      env:
        {{- include "dssm-certs.env" $ctx | nindent 8 }}
      resources:
        {{- toYaml $ctx.Values.jobs.resources | nindent 8 }}
      securityContext:
        {{- toYaml $ctx.Values.securityContext | nindent 8 }}
{{- end -}}
