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

{{- define "visionstream.streamImage" -}}
{{- $image := .Values.streamWorker.image | default dict -}}
{{- printf "%s:%s" ($image.repository | default .Values.image.repository) ($image.tag | default .Values.image.tag | default .Chart.AppVersion) -}}
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
{{- printf "%s://%s-scheduler.%s.svc:8786" (ternary "tls" "tcp" (eq (include "visionstream.daskTls" .) "true")) (include "visionstream.daskCluster" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* "true" where the chart's own DaskCluster speaks mutual TLS (dask.tls). */}}
{{- define "visionstream.daskTls" -}}
{{- if and (not .Values.dask.scheduler) .Values.dask.tls.enabled -}}
{{- if not .Values.dask.tls.secretName -}}
{{- fail "dask.tls.enabled: set dask.tls.secretName to a Secret holding ca.crt, tls.crt and tls.key (a cert-manager Certificate writes one: README, Kubernetes), or set dask.tls.enabled: false where the namespace's network is trusted" -}}
{{- end -}}
true
{{- else -}}
false
{{- end -}}
{{- end -}}

{{/* Where a pod mounts dask.tls's Secret, and the Dask settings that use it (role: scheduler, worker). */}}
{{- define "visionstream.daskTlsEnv" -}}
- {name: DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION, value: "True"}
- {name: DASK_DISTRIBUTED__COMM__TLS__CA_FILE, value: /etc/dask-tls/ca.crt}
- {name: DASK_DISTRIBUTED__COMM__TLS__{{ .role | upper }}__CERT, value: /etc/dask-tls/tls.crt}
- {name: DASK_DISTRIBUTED__COMM__TLS__{{ .role | upper }}__KEY, value: /etc/dask-tls/tls.key}
{{- end -}}

{{/* Lag per replica: autoscaling.lagThreshold; else the higher of one worker's work in hand,
batch.size x max(2, batch.max_in_flight), and throughputPerReplica x acceptableDelaySeconds. */}}
{{- define "visionstream.lagThreshold" -}}
{{- if .Values.autoscaling.lagThreshold -}}
{{- .Values.autoscaling.lagThreshold | int -}}
{{- else -}}
{{- $batch := .Values.config.batch | default dict -}}
{{- $size := $batch.size | default 60 | int -}}
{{- $inFlight := $batch.max_in_flight | default 0 | int -}}
{{- $inHand := mul $size (max 2 $inFlight) -}}
{{- $accepted := mulf (.Values.autoscaling.throughputPerReplica | default 0 | float64) (.Values.autoscaling.acceptableDelaySeconds | default 0 | float64) | ceil | int -}}
{{- max $inHand $accepted -}}
{{- end -}}
{{- end -}}

{{/* The ServiceAccount of the pods that read the bucket ("" = the namespace's default). */}}
{{- define "visionstream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "visionstream.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Writable places on a read-only root: home, caches (pip, matplotlib, CUDA's kernels) under /tmp. */}}
{{- define "visionstream.writableEnv" -}}
- {name: HOME, value: /tmp/home}
- {name: XDG_CACHE_HOME, value: /tmp/cache}
- {name: MPLCONFIGDIR, value: /tmp/cache/matplotlib}
{{- end -}}

{{/* A pod's placement and priority: affinity, topology spread, priority class (group: its values). */}}
{{- define "visionstream.placement" -}}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
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
{{- with $group.podAnnotations }}
metadata:
  annotations:
    {{- toYaml . | nindent 4 }}
{{- end }}
spec:
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with include "visionstream.serviceAccountName" $root }}
  serviceAccountName: {{ . }}
  {{- end }}
  automountServiceAccountToken: false
  securityContext: {runAsNonRoot: true, runAsUser: 10001, fsGroup: 10001, seccompProfile: {type: RuntimeDefault}}
  containers:
    - name: worker
      image: {{ include "visionstream.daskImage" $root | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      # the operator sets DASK_SCHEDULER_ADDRESS and DASK_WORKER_NAME (the pod's name): one
      # process, named so, is a worker the operator can retire by deleting its pod
      {{- $tls := eq (include "visionstream.daskTls" $root) "true" }}
      args:
        - dask
        - worker
        {{- if $tls }}
        - {{ include "visionstream.schedulerAddress" $root | quote }}   # the operator's DASK_SCHEDULER_ADDRESS is tcp://
        {{- end }}
        - --name
        - $(DASK_WORKER_NAME)
        - --nthreads
        - {{ $group.threadsPerProcess | quote }}
        - --dashboard-address
        - ":8788"
      env:
        - {name: VISIONSTREAM_LOCAL_WORKERS, value: "1"}
        # the cores this pod may use, not the node's: the process sizes its threads to them
        - name: VISIONSTREAM_CPUS
          valueFrom: {resourceFieldRef: {containerName: worker, resource: requests.cpu, divisor: "1"}}
        - {name: TORCH_HOME, value: /models/torch}
        {{- include "visionstream.writableEnv" $root | nindent 8 }}
        # CUDA's JIT cache and the compiled forward passes (model.compile_cache_dir), per pod
        - {name: CUDA_CACHE_PATH, value: /var/cache/visionstream/cuda}
        - {name: VISIONSTREAM_MODEL__COMPILE_CACHE_DIR, value: /var/cache/visionstream/compiled}
        {{- if eq .kind "cpu" }}
        - {name: VISIONSTREAM_MODEL__DEVICE, value: cpu}
        {{- end }}
        {{- include "visionstream.storageEnv" $root | nindent 8 }}
        {{- if $tls }}
        {{- include "visionstream.daskTlsEnv" (dict "role" "worker") | nindent 8 }}
        {{- end }}
        {{- with $group.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
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
        - {name: cache, mountPath: /var/cache/visionstream}
        {{- if $tls }}
        - {name: dask-tls, mountPath: /etc/dask-tls, readOnly: true}
        {{- end }}
  volumes:
    - {name: models, emptyDir: {}}   # the weights, downloaded once per pod
    - {name: tmp, emptyDir: {}}
    - {name: cache, emptyDir: {}}
    {{- if $tls }}
    - name: dask-tls
      secret: {secretName: {{ $root.Values.dask.tls.secretName | quote }}, defaultMode: 0400}
    {{- end }}
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- include "visionstream.placement" $group | nindent 2 }}
{{- end -}}
