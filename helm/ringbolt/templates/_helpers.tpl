{{/* Names and labels. */}}
{{- define "ringbolt.fullname" -}}
{{- /* 40: room for the longest suffix ("-coordinator") within Kubernetes' 63, and for the
StatefulSets' pod revision labels. */ -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "ringbolt.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ringbolt.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "ringbolt.image" -}}
{{- $repo := required "image.repository is required: an image with `ringbolt` built with --features cuda (docs/DEPLOY.md)" .Values.image.repository -}}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "ringbolt.etcdEndpoints" -}}
{{- if .Values.etcd.endpoints -}}
{{- .Values.etcd.endpoints -}}
{{- else -}}
{{- printf "http://%s-etcd:2379" (include "ringbolt.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/*
Environment every Ringbolt role shares: where the checkpoint and etcd are, the cluster name,
the member id (the pod's name: a pod restarted in place is the same member) and the address
the others reach it at (the pod's IP).
*/}}
{{- define "ringbolt.commonEnv" -}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_IP
  valueFrom: {fieldRef: {fieldPath: status.podIP}}
- name: RINGBOLT_ID
  value: $(POD_NAME)
- name: RINGBOLT_CHECKPOINT
  value: {{ .Values.checkpoint.mountPath | quote }}
- name: RINGBOLT_ETCD
  value: {{ include "ringbolt.etcdEndpoints" . | quote }}
- name: RINGBOLT_CLUSTER
  value: {{ .Values.cluster | quote }}
- name: RINGBOLT_LEASE_TTL_SECS
  value: {{ .Values.leaseTtlSecs | quote }}
{{- if .Values.metrics.enabled }}
- name: RINGBOLT_METRICS_LISTEN
  value: "0.0.0.0:{{ .Values.metrics.port }}"
{{- end }}
{{- if .Values.otlp.endpoint }}
- name: HOST_IP
  valueFrom: {fieldRef: {fieldPath: status.hostIP}}
- name: RINGBOLT_OTLP_ENDPOINT
  value: {{ .Values.otlp.endpoint | quote }}
{{- end }}
{{- include "ringbolt.securityEnv" . }}
{{- range $k, $v := .Values.env }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- range $k, $v := .Values.nccl.env }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- end -}}

{{- define "ringbolt.checkpointVolume" -}}
- name: checkpoint
{{- if .Values.checkpoint.claimName }}
  persistentVolumeClaim:
    claimName: {{ .Values.checkpoint.claimName }}
    readOnly: true
{{- else if .Values.checkpoint.hostPath }}
  hostPath:
    path: {{ .Values.checkpoint.hostPath }}
    type: Directory
{{- else }}
{{- fail "set checkpoint.claimName (a PVC readable from many nodes) or checkpoint.hostPath: every pod reads the checkpoint" }}
{{- end }}
{{- end -}}

{{- define "ringbolt.checkpointMount" -}}
- name: checkpoint
  mountPath: {{ .Values.checkpoint.mountPath }}
  readOnly: true
{{- end -}}

{{/* A GPU worker's resources: its requests, and its GPUs as limits. */}}
{{- define "ringbolt.workerResources" -}}
{{- $r := deepCopy .w.resources -}}
{{- if and (hasPrefix "cuda" .w.device) (gt (int .w.gpus) 0) -}}
{{- $_ := set $r "limits" (merge (default dict $r.limits) (dict "nvidia.com/gpu" .w.gpus)) -}}
{{- end -}}
{{- toYaml $r -}}
{{- end -}}


{{/* The metrics port of a container, when metrics are on. */}}
{{- define "ringbolt.metricsPort" -}}
{{- if .Values.metrics.enabled -}}
- {name: metrics, containerPort: {{ .Values.metrics.port }}}
{{- end }}
{{- end -}}

{{/* Pod annotations for Prometheus' annotation-based discovery, when metrics are on. */}}
{{- define "ringbolt.metricsAnnotations" -}}
{{- if .Values.metrics.enabled -}}
annotations:
  prometheus.io/scrape: "true"
  prometheus.io/port: {{ .Values.metrics.port | quote }}
  prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/*
TLS, the data-plane secret and etcd's TLS, as every role takes them (files from Secrets).
*/}}
{{- define "ringbolt.securityEnv" -}}
{{- if .Values.tls.secretName }}
- name: RINGBOLT_TLS_CERT
  value: /etc/ringbolt/tls/tls.crt
- name: RINGBOLT_TLS_KEY
  value: /etc/ringbolt/tls/tls.key
- name: RINGBOLT_TLS_CA
  value: /etc/ringbolt/tls/ca.crt
- name: RINGBOLT_TLS_SERVER_NAME
  value: {{ required "tls.serverName is required with tls.secretName: the DNS name every role's certificate carries" .Values.tls.serverName | quote }}
{{- end }}
{{- if .Values.dataPlane.secretName }}
- name: RINGBOLT_DATA_SECRET_FILE
  value: /etc/ringbolt/data-plane/secret
{{- end }}
{{- if .Values.etcdTls.secretName }}
- name: RINGBOLT_ETCD_CA
  value: /etc/ringbolt/etcd/ca.crt
{{- if .Values.etcdTls.clientCertificate }}
- name: RINGBOLT_ETCD_CERT
  value: /etc/ringbolt/etcd/tls.crt
- name: RINGBOLT_ETCD_KEY
  value: /etc/ringbolt/etcd/tls.key
{{- end }}
{{- end }}
{{- end -}}

{{/* A worker's gRPC port requires client certificates (mutual TLS). */}}
{{- define "ringbolt.workerTlsEnv" -}}
{{- if and .Values.tls.secretName .Values.tls.mutual }}
- name: RINGBOLT_TLS_CLIENT_CA
  value: /etc/ringbolt/tls/ca.crt
{{- end }}
{{- end -}}

{{/* Mounts of the Secrets above (a renewed Secret reaches the files; roles re-read them). */}}
{{- define "ringbolt.securityMounts" -}}
{{- if .Values.tls.secretName }}
- {name: tls, mountPath: /etc/ringbolt/tls, readOnly: true}
{{- end }}
{{- if .Values.dataPlane.secretName }}
- {name: data-plane-secret, mountPath: /etc/ringbolt/data-plane, readOnly: true}
{{- end }}
{{- if .Values.etcdTls.secretName }}
- {name: etcd-tls, mountPath: /etc/ringbolt/etcd, readOnly: true}
{{- end }}
{{- end -}}

{{- define "ringbolt.securityVolumes" -}}
{{- if .Values.tls.secretName }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    items: [{key: tls.crt, path: tls.crt}, {key: tls.key, path: tls.key}, {key: ca.crt, path: ca.crt}]
{{- end }}
{{- if .Values.dataPlane.secretName }}
- name: data-plane-secret
  secret:
    secretName: {{ .Values.dataPlane.secretName }}
    items: [{key: secret, path: secret}]
{{- end }}
{{- if .Values.etcdTls.secretName }}
- name: etcd-tls
  secret:
    secretName: {{ .Values.etcdTls.secretName }}
{{- end }}
{{- end -}}

{{/* A Service's metrics port, when metrics are on (scraped through a ServiceMonitor). */}}
{{- define "ringbolt.metricsServicePort" -}}
{{- if .Values.metrics.enabled -}}
- {name: metrics, port: {{ .Values.metrics.port }}, targetPort: metrics}
{{- end }}
{{- end -}}
