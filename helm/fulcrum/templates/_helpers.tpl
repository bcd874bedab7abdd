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
          {{- if kindIs "map" $value }}
          {{- /* a reference, never the value: {valueFrom: {secretKeyRef: {name, key}}} or the shorthand */}}
          valueFrom: {{- toYaml (get $value "valueFrom" | default $value) | nindent 12 }}
          {{- else }}
          value: {{ $value | quote }}
          {{- end }}
        {{- end }}
      {{- end }}
      {{- with $v.envFrom }}
      envFrom: {{- toYaml . | nindent 8 }}
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


{{/*
Packing, exactly as cluster/placement.py pack(): ranks -> pods. A pod takes up to gpusPerNode GPUs
(NVLink and shared memory for one job's ranks); ranks per pod = pod GPUs / gpusPerRank; replicas =
ceil(ranks / ranks per pod), balanced; CPU = ranks per pod x cpusPerRank + 1 and memory = 16Gi per rank
unless given. Arguments: ranks, gpusPerRank, cpusPerRank, gpusPerNode, podGpus (0/nil: sized), cpu,
memory ("": sized), spread (serving: one replica per pod unless replicas share a GPU).
Emits YAML: group, replicas, perPod, gpus, cpu, memory.
*/}}
{{- define "fulcrum.pack" -}}
{{- $eps := 0.000000001 -}}
{{- $ranks := int .ranks -}}
{{- $gpr := float64 .gpusPerRank -}}
{{- $perPod := 1 -}}
{{- $gpus := 0 -}}
{{- $replicas := $ranks -}}
{{- if gt $gpr 0.0 -}}
  {{- $max := 1 -}}
  {{- if .podGpus -}}
    {{- $max = int (floor (addf (divf .podGpus $gpr) $eps)) -}}
    {{- if lt $max 1 -}}
      {{- fail (printf "worker gpus %v is less than one worker's %v GPUs" .podGpus $gpr) -}}
    {{- end -}}
  {{- else if .spread -}}
    {{- if lt $gpr 1.0 }}{{ $max = max 1 (int (floor (addf (divf 1 $gpr) $eps))) }}{{ end -}}
  {{- else -}}
    {{- $max = max 1 (int (floor (addf (divf .gpusPerNode $gpr) $eps))) -}}
  {{- end -}}
  {{- $replicas = int (ceil (divf $ranks $max)) -}}
  {{- $perPod = int (ceil (divf $ranks $replicas)) -}}
  {{- if .podGpus -}}
    {{- $gpus = int .podGpus -}}
  {{- else -}}
    {{- $gpus = max 1 (int (ceil (subf (mulf $perPod $gpr) $eps))) -}}
  {{- end -}}
{{- end -}}
group: {{ ternary "gpu-workers" "cpu-workers" (gt (int $gpus) 0) }}
replicas: {{ $replicas }}
perPod: {{ $perPod }}
gpus: {{ $gpus }}
cpu: {{ .cpu | default (printf "%d" (add1 (int (ceil (subf (mulf $perPod .cpusPerRank) $eps))))) | quote }}
memory: {{ .memory | default (printf "%dGi" (mul $perPod 16)) | quote }}
{{- end -}}

{{/* One packed worker group. Arguments: root, pack (from fulcrum.pack), groupName, nodeSelector,
tolerations, specConfigMap. */}}
{{- define "fulcrum.packedGroup" -}}
{{- $p := .pack -}}
- groupName: {{ .groupName | default $p.group }}
  replicas: {{ int $p.replicas }}
  minReplicas: {{ int $p.replicas }}
  maxReplicas: {{ int $p.replicas }}
  rayStartParams: {}
  template:
    {{- include "fulcrum.pod" (dict "root" .root "container" "ray-worker" "cpu" $p.cpu "memory" $p.memory "gpus" (int $p.gpus) "nodeSelector" .nodeSelector "tolerations" .tolerations "specConfigMap" .specConfigMap) | nindent 4 }}
{{- end -}}
