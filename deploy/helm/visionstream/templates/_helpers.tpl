{{- define "visionstream.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "visionstream.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "visionstream.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: stream-worker
{{- end -}}

{{- define "visionstream.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "visionstream.daskImage" -}}
{{- $image := merge (deepCopy (.Values.dask.image | default dict)) (dict "repository" .Values.image.repository "tag" (.Values.image.tag | default .Chart.AppVersion)) -}}
{{- printf "%s:%s" $image.repository $image.tag -}}
{{- end -}}

{{/* The DaskCluster's name; the operator names its scheduler Service "<name>-scheduler". */}}
{{- define "visionstream.daskCluster" -}}
{{- printf "%s-dask" (include "visionstream.fullname" .) -}}
{{- end -}}

{{- define "visionstream.schedulerAddress" -}}
{{- if .Values.dask.scheduler -}}
{{- .Values.dask.scheduler -}}
{{- else -}}
{{- printf "tcp://%s-scheduler.%s.svc:8786" (include "visionstream.daskCluster" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* Lag per replica: autoscaling.lagThreshold, else batch.size x max(2, batch.max_in_flight). */}}
{{- define "visionstream.lagThreshold" -}}
{{- if .Values.autoscaling.lagThreshold -}}
{{- .Values.autoscaling.lagThreshold | int -}}
{{- else -}}
{{- $batch := .Values.config.batch | default dict -}}
{{- $size := $batch.size | default 60 | int -}}
{{- $inFlight := $batch.max_in_flight | default 0 | int -}}
{{- mul $size (max 2 $inFlight) -}}
{{- end -}}
{{- end -}}

{{- define "visionstream.drainSeconds" -}}
{{- $worker := .Values.config.worker | default dict -}}
{{- if hasKey $worker "shutdown_grace_s" -}}{{ $worker.shutdown_grace_s | ceil | int }}{{- else -}}30{{- end -}}
{{- end -}}

{{- define "visionstream.partitions" -}}
{{- $topics := .Values.config.topics | default dict -}}
{{- $topics.partitions | default 4 | int -}}
{{- end -}}

{{/* Storage credentials from an existing Secret (none: the pod's role or workload identity). */}}
{{- define "visionstream.storageEnv" -}}
{{- with .Values.secrets.storage }}
{{- if .name }}
- name: AWS_ACCESS_KEY_ID
  valueFrom: {secretKeyRef: {name: {{ .name | quote }}, key: {{ .accessKeyIdKey | quote }}}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom: {secretKeyRef: {name: {{ .name | quote }}, key: {{ .secretAccessKeyKey | quote }}}}
{{- end }}
{{- end }}
{{- end -}}

{{/* A Dask worker pod's spec, one worker process: kind gpu or cpu, group its values. */}}
{{- define "visionstream.daskWorkerSpec" -}}
{{- $root := .root -}}
{{- $group := .group -}}
spec:
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  automountServiceAccountToken: false
  securityContext: {runAsNonRoot: true, runAsUser: 10001, fsGroup: 10001, seccompProfile: {type: RuntimeDefault}}
  containers:
    - name: worker
      image: {{ include "visionstream.daskImage" $root | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      # the operator sets DASK_SCHEDULER_ADDRESS and DASK_WORKER_NAME (the pod's name): one
      # process, named so, is a worker the operator can retire by deleting its pod
      args: [dask, worker, --name, $(DASK_WORKER_NAME), --nthreads, {{ $group.threadsPerProcess | quote }}, --dashboard-address, ":8788"]
      env:
        - {name: VISIONSTREAM_LOCAL_WORKERS, value: "1"}
        # the cores this pod may use, not the node's: the process sizes its threads to them
        - name: VISIONSTREAM_CPUS
          valueFrom: {resourceFieldRef: {containerName: worker, resource: requests.cpu, divisor: "1"}}
        - {name: TORCH_HOME, value: /models/torch}
        {{- if eq .kind "cpu" }}
        - {name: VISIONSTREAM_MODEL__DEVICE, value: cpu}
        {{- end }}
        {{- include "visionstream.storageEnv" $root | nindent 8 }}
      ports:
        - {name: http-dashboard, containerPort: 8788, protocol: TCP}
      livenessProbe:
        httpGet: {port: http-dashboard, path: /health}
        periodSeconds: 15
        failureThreshold: 8   # a model load (minutes with a download) never fails it
      resources:
        {{- toYaml $group.resources | nindent 8 }}
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities: {drop: [ALL]}
      volumeMounts:
        - {name: models, mountPath: /models/torch}
        - {name: tmp, mountPath: /tmp}
  volumes:
    - {name: models, emptyDir: {}}   # the weights, downloaded once per pod
    - {name: tmp, emptyDir: {}}
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
