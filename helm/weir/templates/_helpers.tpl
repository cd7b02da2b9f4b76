{{/* The chart name, or nameOverride. */}}
{{- define "weir.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The resource name prefix: <release>-<chart>, or the release name alone when it already
contains the chart name. Kept to 52 characters: StatefulSet pods carry a controller-revision-hash
label built from the name, and labels stop at 63.
*/}}
{{- define "weir.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The service account the pods run as. */}}
{{- define "weir.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "weir.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "weir.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "weir.labels" -}}
helm.sh/chart: {{ include "weir.chart" . }}
{{ include "weir.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels never change after install: StatefulSet selectors are immutable. */}}
{{- define "weir.selectorLabels" -}}
app.kubernetes.io/name: {{ include "weir.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The field WEIR_INSTANCE is read from. A label the pod lacks reads as an empty string, which
would give every replica the same transactional id, so podIndex is refused where Kubernetes
does not set the label.
*/}}
{{- define "weir.instanceFieldPath" -}}
{{- if eq .Values.instanceId.source "podIndex" }}
{{- if not (semverCompare ">=1.28.0-0" .Capabilities.KubeVersion.Version) }}
{{- fail (printf "instanceId.source=podIndex needs Kubernetes >= 1.28 (this is %s): set instanceId.source=podName" .Capabilities.KubeVersion.Version) }}
{{- end }}
{{- print "metadata.labels['apps.kubernetes.io/pod-index']" }}
{{- else if eq .Values.instanceId.source "podName" }}
{{- print "metadata.name" }}
{{- else }}
{{- fail (printf "instanceId.source must be podIndex or podName, not %q" .Values.instanceId.source) }}
{{- end }}
{{- end }}

{{/*
The container's resources: .Values.resources, with a memory request and limit derived from
stateMemory where it names none (request: base + workers x (cache + write buffers), each
worker having its own store; limit: 1.5 times).
*/}}
{{- define "weir.resources" -}}
{{- $resources := deepCopy (.Values.resources | default dict) -}}
{{- $memory := add .Values.stateMemory.baseMiB (mul (.Values.workers | default 1) (add .Values.stateMemory.cacheMiB .Values.stateMemory.writeBuffersMiB)) -}}
{{- $requests := get $resources "requests" | default dict -}}
{{- if not (get $requests "memory") }}{{ $_ := set $requests "memory" (printf "%dMi" $memory) }}{{ end -}}
{{- $_ := set $resources "requests" $requests -}}
{{- $limits := get $resources "limits" | default dict -}}
{{- if not (get $limits "memory") }}{{ $_ := set $limits "memory" (printf "%dMi" (div (mul $memory 3) 2)) }}{{ end -}}
{{- $_ := set $resources "limits" $limits -}}
{{- toYaml $resources -}}
{{- end -}}
