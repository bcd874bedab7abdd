{{/* The object name prefix: the release name, short enough for KubeRay's pod-name suffixes. */}}
{{- define "fulcrum.fullname" -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "fulcrum.labels" -}}
app.kubernetes.io/name: fulcrum
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/*
A pod template. Arguments (a dict): root (the chart's top scope), container, cpu, memory, gpus,
nodeSelector, tolerations, ports, specConfigMap (mounted at /etc/fulcrum when set).
*/}}
{{- define "fulcrum.pod" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
spec:
  {{- with $v.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  {{- $selector := merge (dict) (.nodeSelector | default dict) ($v.nodeSelector | default dict) }}
  {{- with $selector }}
  nodeSelector: {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $tolerations := concat ($v.tolerations | default list) (.tolerations | default list) }}
  {{- with $tolerations }}
  tolerations: {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .container }}
      image: "{{ $v.image.repository }}:{{ $v.image.tag }}"
      imagePullPolicy: {{ $v.image.pullPolicy }}
      {{- with $v.env }}
      env:
        {{- range $name, $value := . }}
        - name: {{ $name }}
          value: {{ $value | quote }}
        {{- end }}
      {{- end }}
      {{- with .ports }}
      ports: {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        requests:
          cpu: {{ .cpu | quote }}
          memory: {{ .memory | quote }}
        limits:
          cpu: {{ .cpu | quote }}
          memory: {{ .memory | quote }}
          {{- if .gpus }}
          nvidia.com/gpu: {{ .gpus }}
          {{- end }}
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        {{- if .specConfigMap }}
        - name: fulcrum-spec
          mountPath: /etc/fulcrum
          readOnly: true
        {{- end }}
        {{- if $v.sharedVolume.enabled }}
        - name: fulcrum-storage
          mountPath: {{ $v.sharedVolume.mountPath }}
        {{- end }}
  volumes:
    # torch's data loaders and NCCL need more shared memory than a container's default 64 MiB
    - name: dshm
      emptyDir:
        medium: Memory
    {{- if .specConfigMap }}
    - name: fulcrum-spec
      configMap:
        name: {{ .specConfigMap }}
    {{- end }}
    {{- if $v.sharedVolume.enabled }}
    - name: fulcrum-storage
      persistentVolumeClaim:
        claimName: {{ $v.sharedVolume.claimName }}
    {{- end }}
{{- end -}}

{{/* headGroupSpec. Arguments: root, specConfigMap, serve (adds the Serve port). */}}
{{- define "fulcrum.head" -}}
{{- $v := .root.Values -}}
{{- $ports := list (dict "containerPort" 6379 "name" "gcs-server") (dict "containerPort" 8265 "name" "dashboard") (dict "containerPort" 10001 "name" "client") -}}
{{- if .serve }}{{ $ports = append $ports (dict "containerPort" 8000 "name" "serve") }}{{ end -}}
rayStartParams:
  {{- toYaml (merge (dict "dashboard-host" "0.0.0.0") $v.head.rayStartParams) | nindent 2 }}
template:
  {{- include "fulcrum.pod" (dict "root" .root "container" "ray-head" "cpu" $v.head.cpu "memory" $v.head.memory "gpus" 0 "ports" $ports "specConfigMap" .specConfigMap) | nindent 2 }}
{{- end -}}

{{/* workerGroupSpecs from .Values.workerGroups. Arguments: root, specConfigMap. */}}
{{- define "fulcrum.workers" -}}
{{- $root := .root -}}
{{- $cm := .specConfigMap -}}
{{- range $root.Values.workerGroups }}
{{- if .enabled }}
- groupName: {{ .name }}
  replicas: {{ .replicas }}
  minReplicas: {{ .minReplicas }}
  maxReplicas: {{ .maxReplicas }}
  rayStartParams: {}
  template:
    {{- include "fulcrum.pod" (dict "root" $root "container" "ray-worker" "cpu" .cpu "memory" .memory "gpus" .gpus "nodeSelector" .nodeSelector "tolerations" .tolerations "specConfigMap" $cm) | nindent 4 }}
{{- end }}
{{- end }}
{{- end -}}
