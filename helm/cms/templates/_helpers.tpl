{{/*
Naming, labels, identities and the rendered TOML config of each workload.

The four workloads of this chart are "template", "directory", "custody" and "gateway". Most
helpers take a dict: (dict "root" $ "name" "custody").
*/}}

{{/* The workloads this chart deploys, in start order (the gateway needs the three others). */}}
{{- define "cms.workloads" -}}
template directory custody gateway
{{- end }}

{{/* Workloads that own a database (and a data_dir): the gateway keeps its workflow state. */}}
{{- define "cms.dbWorkloads" -}}
template directory custody gateway
{{- end }}

{{/*
Workloads whose binary takes `--migrate-only`, migrated by the hook Job on PostgreSQL: every
workload with a database.
*/}}
{{- define "cms.migrateJobWorkloads" -}}
template directory custody gateway
{{- end }}

{{- define "cms.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name. A release called "cms" (or containing "cms") gives "cms", so the
Services are cms-template, cms-directory, cms-custody and cms-gateway. Truncated to 50
characters so "<fullname>-directory-tls" stays within 63.
*/}}
{{- define "cms.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "cms.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of a workload's Deployment, Service, ConfigMap, ServiceAccount, ...: <fullname>-<name>. */}}
{{- define "cms.componentName" -}}
{{- printf "%s-%s" (include "cms.fullname" .root) .name }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "cms.labels" -}}
helm.sh/chart: {{ include "cms.chart" . }}
app.kubernetes.io/name: {{ include "cms.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cms
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of one workload's objects. */}}
{{- define "cms.componentLabels" -}}
{{ include "cms.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{/* Selector labels of one workload's pods (stable across upgrades). */}}
{{- define "cms.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cms.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{/* SPIFFE ID of a workload: spiffe://<trustDomain>/cms/<name>. */}}
{{- define "cms.spiffeId" -}}
{{- printf "spiffe://%s/cms/%s" .root.Values.trustDomain .name }}
{{- end }}

{{/* Secret holding the workload's ca.crt, tls.crt and tls.key. */}}
{{- define "cms.tlsSecretName" -}}
{{- $w := index .root.Values .name }}
{{- default (printf "%s-tls" (include "cms.componentName" .)) $w.tlsSecretName }}
{{- end }}

{{/* In-cluster DNS name clients dial: <component>.<namespace>.svc. */}}
{{- define "cms.serviceHost" -}}
{{- printf "%s.%s.svc" (include "cms.componentName" .) .root.Release.Namespace }}
{{- end }}

{{/*
DNS SANs of a workload's certificate, one per line: every name a client may dial inside the
cluster, plus the workload's extraDnsNames (e.g. the gateway's external host name).
*/}}
{{- define "cms.dnsNames" -}}
{{- $svc := include "cms.componentName" . }}
{{- $ns := .root.Release.Namespace }}
{{- $w := index .root.Values .name }}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .root.Values.clusterDomain) }}
{{- range $w.extraDnsNames }}
{{- $names = append $names . }}
{{- end }}
{{- range uniq $names }}
{{ . }}
{{- end }}
{{- end }}

{{- define "cms.image" -}}
{{- $img := .Values.image }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) }}
{{- end }}
{{- end }}

{{/* "true" when a database workload keeps SQLite in its data_dir (no database URL Secret). */}}
{{- define "cms.usesSqlite" -}}
{{- $w := index .root.Values .name }}
{{- if and (has .name (splitList " " (include "cms.dbWorkloads" .root))) (not $w.database.urlSecret.name) -}}
true
{{- end }}
{{- end }}

{{/*
Replicas of a workload's Deployment. Custody's "auto": 2 on PostgreSQL (active/standby), 1 on
SQLite.
*/}}
{{- define "cms.replicas" -}}
{{- $w := index .root.Values .name }}
{{- if eq (toString $w.replicas) "auto" }}
{{- if include "cms.usesSqlite" . }}1{{ else }}2{{ end }}
{{- else }}
{{- int $w.replicas }}
{{- end }}
{{- end }}

{{/* "true" when a HorizontalPodAutoscaler owns the workload's replica count. */}}
{{- define "cms.autoscaled" -}}
{{- $w := index .root.Values .name }}
{{- if and $w.autoscaling $w.autoscaling.enabled -}}
true
{{- end }}
{{- end }}

{{/* The most pods a workload may run: its replicas, or the autoscaler's maximum. */}}
{{- define "cms.maxReplicas" -}}
{{- $w := index .root.Values .name }}
{{- if include "cms.autoscaled" . }}
{{- int $w.autoscaling.maxReplicas }}
{{- else }}
{{- include "cms.replicas" . }}
{{- end }}
{{- end }}

{{/* The fewest pods a workload runs outside a rollout: its replicas, or the autoscaler's minimum. */}}
{{- define "cms.minReplicas" -}}
{{- $w := index .root.Values .name }}
{{- if include "cms.autoscaled" . }}
{{- int $w.autoscaling.minReplicas }}
{{- else }}
{{- include "cms.replicas" . }}
{{- end }}
{{- end }}

{{/* "true" when custody runs active/standby (PostgreSQL, more than one replica). */}}
{{- define "cms.activeStandby" -}}
{{- if and (eq .name "custody") (gt (int (include "cms.replicas" .)) 1) -}}
true
{{- end }}
{{- end }}

{{/* Refuses values that cannot work; called from every workload's Deployment. */}}
{{- define "cms.validate" -}}
{{- $w := index .root.Values .name }}
{{- $most := int (include "cms.maxReplicas" .) }}
{{- if and (include "cms.usesSqlite" .) (gt $most 1) }}
{{- if eq .name "custody" }}
{{- fail (printf "custody: replicas=%d needs a PostgreSQL database (custody.database.urlSecret.name): a second custody on one SQLite file refuses to start; with PostgreSQL the replicas run active/standby" $most) }}
{{- else }}
{{- fail (printf "%s: %d replicas needs a PostgreSQL database (%s.database.urlSecret.name): each replica would otherwise open its own SQLite file" .name $most .name) }}
{{- end }}
{{- end }}
{{- if include "cms.autoscaled" . }}
{{- $a := $w.autoscaling }}
{{- if gt (int $a.minReplicas) (int $a.maxReplicas) }}
{{- fail (printf "%s.autoscaling: minReplicas (%d) is above maxReplicas (%d)" .name (int $a.minReplicas) (int $a.maxReplicas)) }}
{{- end }}
{{- if not (or $a.targetCPUUtilizationPercentage $a.targetMemoryUtilizationPercentage) }}
{{- fail (printf "%s.autoscaling: set targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" .name) }}
{{- end }}
{{- $requests := default dict (default dict $w.resources).requests }}
{{- if and $a.targetCPUUtilizationPercentage (not $requests.cpu) }}
{{- fail (printf "%s.autoscaling: targetCPUUtilizationPercentage needs %s.resources.requests.cpu (utilization is a percentage of it)" .name .name) }}
{{- end }}
{{- if and $a.targetMemoryUtilizationPercentage (not $requests.memory) }}
{{- fail (printf "%s.autoscaling: targetMemoryUtilizationPercentage needs %s.resources.requests.memory (utilization is a percentage of it)" .name .name) }}
{{- end }}
{{- end }}
{{- if and .root.Values.certManager.enabled (not .root.Values.certManager.issuerRef.name) }}
{{- fail "certManager.enabled needs certManager.issuerRef.name (an Issuer or ClusterIssuer that can sign URI SANs, e.g. a CA or Vault issuer)" }}
{{- end }}
{{- end }}

{{/*
checksum/secrets of a workload's pods: a hash of the versions (uid and resourceVersion, never
the contents) of the Secrets it reads, TLS and database URL, looked up in the cluster at
install/upgrade time, so that `helm upgrade` rolls the pods when one of them changed.
`helm template` (no cluster) sees none: the hash is then of their names only.
*/}}
{{- define "cms.secretsChecksum" -}}
{{- $w := index .root.Values .name }}
{{- $ns := .root.Release.Namespace }}
{{- $names := list }}
{{- if .root.Values.tls.mountSecret }}
{{- $names = append $names (include "cms.tlsSecretName" .) }}
{{- end }}
{{- if and $w.database $w.database.urlSecret.name }}
{{- $names = append $names $w.database.urlSecret.name }}
{{- end }}
{{- $versions := dict }}
{{- range $names }}
{{- $meta := default dict (lookup "v1" "Secret" $ns .).metadata }}
{{- $_ := set $versions . (printf "%v/%v" (default "" $meta.uid) (default "" $meta.resourceVersion)) }}
{{- end }}
{{- toJson $versions | sha256sum }}
{{- end }}

{{/*
The TOML config of a workload. Every key here is one the service's config struct knows (they
reject unknown keys). The database URL is deliberately absent: it comes from a Secret through
the CMS_<SERVICE>__DATABASE__URL environment variable.
*/}}
{{- define "cms.configToml" -}}
{{- $v := .root.Values }}
{{- $w := index $v .name }}
{{- $name := .name }}
{{- $root := .root -}}
# cms-{{ $name }} configuration, rendered by the cms Helm chart from its values.
# CMS_{{ upper $name }}__<SECTION>__<KEY> environment variables override any key.
{{- if has $name (splitList " " (include "cms.dbWorkloads" $root)) }}

# SQLite file <data_dir>/{{ $name }}.sqlite3 unless database.url is set (from a Secret).
data_dir = "/var/lib/cms"
{{- end }}

[server]
listen = {{ printf "%s:%d" $v.server.bindAddress (int $w.port) | toJson }}
ops_listen = {{ printf "%s:%d" $v.server.bindAddress (int $w.opsPort) | toJson }}
handshake_timeout_ms = {{ int64 $v.server.handshakeTimeoutMs }}
max_concurrent_handshakes = {{ int64 $v.server.maxConcurrentHandshakes }}
shutdown_grace_ms = {{ int64 $v.server.shutdownGraceMs }}
max_concurrent_streams = {{ int64 $v.server.maxConcurrentStreams }}

[tls]
ca = "/etc/cms/tls/ca.pem"
cert = "/etc/cms/tls/tls.crt"
key = "/etc/cms/tls/tls.key"
reload_interval_ms = {{ int64 $v.tls.reloadIntervalMs }}

[access]
{{- $allow := list }}
{{- if eq $name "gateway" }}
{{- $td := $v.trustDomain }}
{{- $allow = list (printf "spiffe://%s/cms/operator/*" $td) (printf "spiffe://%s/cms/agent" $td) (printf "spiffe://%s/cms/agent/*" $td) (printf "spiffe://%s/cms/service/*" $td) }}
{{- else }}
{{- $allow = list (include "cms.spiffeId" (dict "root" $root "name" "gateway")) }}
{{- end }}
{{- range $w.access.extraAllow }}
{{- $allow = append $allow . }}
{{- end }}
allow = {{ uniq $allow | toJson }}
{{- if eq $name "custody" }}
{{- $g := $w.gatewayScope }}

# What each caller may do (custody refuses a caller without an entry).
[[callers]]
identity = {{ include "cms.spiffeId" (dict "root" $root "name" "gateway") | toJson }}
key_references = {{ $g.keyReferences | toJson }}
admin = {{ $g.admin }}
release_puk = {{ $g.releasePuk }}
{{- range $w.extraCallers }}

[[callers]]
identity = {{ .identity | toJson }}
key_references = {{ .keyReferences | default list | toJson }}
admin = {{ .admin | default false }}
{{- end }}
{{- end }}
{{- if has $name (splitList " " (include "cms.dbWorkloads" $root)) }}

[database]
max_connections = {{ int64 $w.database.maxConnections }}
{{- end }}
{{- if eq $name "gateway" }}
{{- range $backend := list "template" "directory" "custody" }}
{{- $b := dict "root" $root "name" $backend }}

[backends.{{ $backend }}]
address = {{ printf "%s:%d" (include "cms.serviceHost" $b) (int (index $v $backend).port) | toJson }}
identity = {{ include "cms.spiffeId" $b | toJson }}
connect_timeout_ms = {{ int64 $w.backends.connectTimeoutMs }}
{{- if include "cms.activeStandby" $b }}
# Every custody pod (a headless Service): each gets the Unseal shares and Seal.
instances = [{{ printf "%s-instances.%s.svc:%d" (include "cms.componentName" $b) $root.Release.Namespace (int (index $v $backend).port) | toJson }}]
{{- end }}
{{- end }}

[agent_link]
hello_timeout_ms = {{ int64 $w.agentLink.helloTimeoutMs }}
stale_after_ms = {{ int64 $w.agentLink.staleAfterMs }}
{{- end }}

[telemetry]
log = {{ $v.telemetry.log | toJson }}
json = {{ $v.telemetry.json }}
{{- with $v.telemetry.otlpEndpoint }}
otlp_endpoint = {{ toJson . }}
{{- end }}
export_delay_ms = {{ int64 $v.telemetry.exportDelayMs }}
{{ end }}
