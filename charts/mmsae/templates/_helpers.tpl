{{/* Names, labels and the settings several templates share. */}}

{{- define "mmsae.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mmsae.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The name of one component's resources: <fullname>-<component>. */}}
{{- define "mmsae.componentName" -}}
{{- printf "%s-%s" (include "mmsae.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mmsae.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
{{ include "mmsae.selectorLabels" . }}
{{- end -}}

{{- define "mmsae.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mmsae.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* An image reference from {repository, tag}; an empty tag means the chart's appVersion. */}}
{{- define "mmsae.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{- define "mmsae.baseImage" -}}
{{- include "mmsae.image" (dict "image" .Values.images.base "root" .) -}}
{{- end -}}

{{- define "mmsae.trainImage" -}}
{{- include "mmsae.image" (dict "image" .Values.images.train "root" .) -}}
{{- end -}}

{{- define "mmsae.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The S3 endpoint every client uses: s3.endpoint, else the chart's SeaweedFS, else AWS S3. */}}
{{- define "mmsae.s3Endpoint" -}}
{{- if .Values.s3.endpoint -}}
{{- .Values.s3.endpoint -}}
{{- else if .Values.objectStore.enabled -}}
{{- printf "http://%s:%d" (include "mmsae.componentName" (dict "root" . "component" "s3")) (int .Values.objectStore.port) -}}
{{- else -}}
{{- printf "https://s3.%s.amazonaws.com" .Values.s3.region -}}
{{- end -}}
{{- end -}}

{{- define "mmsae.s3SecretName" -}}
{{- default (include "mmsae.componentName" (dict "root" . "component" "s3-credentials")) .Values.s3.credentials.existingSecret -}}
{{- end -}}

{{/* The environment of a container that talks to S3: endpoint, region and the credentials' Secret. */}}
{{- define "mmsae.s3Env" -}}
- name: AWS_ENDPOINT_URL
  value: {{ include "mmsae.s3Endpoint" . | quote }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ include "mmsae.s3Endpoint" . | quote }}
- name: AWS_REGION
  value: {{ .Values.s3.region | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.s3.region | quote }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "mmsae.s3SecretName" . }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "mmsae.s3SecretName" . }}
      key: AWS_SECRET_ACCESS_KEY
{{- end -}}

{{- define "mmsae.mlflowUrl" -}}
{{- printf "http://%s:%d" (include "mmsae.componentName" (dict "root" . "component" "mlflow")) (int .Values.mlflow.port) -}}
{{- end -}}

{{- define "mmsae.explainerUrl" -}}
{{- printf "http://%s:%d/v1" (include "mmsae.componentName" (dict "root" . "component" "explainer")) (int .Values.explainer.port) -}}
{{- end -}}

{{- define "mmsae.explainerSecretName" -}}
{{- default (include "mmsae.componentName" (dict "root" . "component" "explainer")) .Values.explainer.apiKey.existingSecret -}}
{{- end -}}

{{- define "mmsae.postgresSecretName" -}}
{{- default (include "mmsae.componentName" (dict "root" . "component" "postgres")) .Values.postgres.existingSecret -}}
{{- end -}}

{{- define "mmsae.pipelineRoot" -}}
{{- default (printf "s3://%s/pipelines" .Values.s3.bucket) .Values.kfpLauncher.defaultPipelineRoot -}}
{{- end -}}

{{/*
A value kept across upgrades: the key's value in the existing Secret when there is one (helm looks it up
in the cluster), else the given value, else a random one.
*/}}
{{- define "mmsae.keptSecretValue" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .secret -}}
{{- if and $existing (index ($existing.data | default dict) .key) -}}
{{- index $existing.data .key | b64dec -}}
{{- else if .given -}}
{{- .given -}}
{{- else -}}
{{- randAlphaNum .length -}}
{{- end -}}
{{- end -}}
