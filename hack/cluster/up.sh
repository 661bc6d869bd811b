#!/usr/bin/env bash
# Start a local Kubernetes test control plane on 127.0.0.1: real etcd,
# kube-apiserver, kube-controller-manager and kube-scheduler, run as plain
# processes by `kwokctl --runtime binary`, plus the kwok controller, which plays
# the kubelet for fake nodes (pods become Running/Ready, Job pods Succeeded;
# no image is pulled and no container runs).
#
# Uses only the binaries from hack/cluster/build.sh (built first if missing);
# kwokctl is given a local path for every component it starts, so it never
# downloads anything.
#
# Env: RELAY_CLUSTER_DIR   state + kubeconfig (default ~/.cache/smtp-relay-cluster)
#      RELAY_CLUSTER_NAME  kwok cluster name (default smtp-relay)
#      RELAY_CLUSTER_NODES number of fake nodes (default 1)
#      RELAY_TOOLS_CACHE   where build.sh put the binaries
# Afterwards: eval "$(hack/cluster/env.sh)"   # PATH + KUBECONFIG
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NODES=${RELAY_CLUSTER_NODES:-1}
TIMEOUT=${RELAY_CLUSTER_TIMEOUT:-180}   # seconds for each wait

"${CLUSTER_HACK_DIR}/build.sh" >&2
export PATH=${RELAY_TOOLS_PATH}:${PATH}

# kwokctl keeps its state under KWOK_WORKDIR (not ~/.kwok).
export KWOK_WORKDIR=${RELAY_CLUSTER_DIR}/kwok
mkdir -p "${KWOK_WORKDIR}"
CONFIG=${RELAY_CLUSTER_DIR}/kwokctl.yaml
# Keep kubectl's discovery cache out of ~/.kube.
export KUBECACHEDIR=${RELAY_CLUSTER_DIR}/kube-cache
KUBECTL=(kubectl --kubeconfig "${RELAY_KUBECONFIG}")

# Every binary kwokctl could start is a local file; the options that would
# need a download (metrics-server, dashboard, prometheus, jaeger) stay off.
cat >"${CONFIG}" <<EOF
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokctlConfiguration
options:
  runtime: binary
  bindAddress: 127.0.0.1
  kubeVersion: ${KUBE_VERSION}
  etcdVersion: ${ETCD_VERSION#v}
  kwokVersion: ${KWOK_VERSION}
  components: [etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok-controller]
  enableMetricsServer: false
  quietPull: true
  cacheDir: ${KWOK_WORKDIR}/cache
  kubeBinaryPrefix: ${K8S_BIN}
  kubeApiserverBinary: ${K8S_BIN}/kube-apiserver
  kubeControllerManagerBinary: ${K8S_BIN}/kube-controller-manager
  kubeSchedulerBinary: ${K8S_BIN}/kube-scheduler
  kubectlBinary: ${K8S_BIN}/kubectl
  etcdBinary: ${ETCD_BIN}/etcd
  kwokBinaryPrefix: ${KWOK_BIN}
  kwokControllerBinary: ${KWOK_BIN}/kwok
# kube-apiserver's own default Service range is 10.0.0.0/24, 254 addresses: the operator
# benchmark's 200 relays fill four fifths of it, and a few more relays than that would
# be refused their Service. A cluster's usual range instead (kubeadm's default).
componentsPatches:
  - name: kube-apiserver
    extraArgs:
      - key: service-cluster-ip-range
        value: 10.96.0.0/12
EOF

kwokctl_() { kwokctl -c "${CONFIG}" --name "${RELAY_CLUSTER_NAME}" "$@"; }

start=$(date +%s)
if kwokctl get clusters 2>/dev/null | grep -qx "${RELAY_CLUSTER_NAME}"; then
  cluster_log "cluster ${RELAY_CLUSTER_NAME} exists; (re)starting its processes"
  kwokctl_ start cluster --timeout "${TIMEOUT}s" --wait "${TIMEOUT}s" >&2
else
  cluster_log "creating cluster ${RELAY_CLUSTER_NAME} in ${KWOK_WORKDIR}"
  rm -f "${RELAY_KUBECONFIG}"
  kwokctl_ create cluster --runtime binary --kubeconfig "${RELAY_KUBECONFIG}" \
    --timeout "${TIMEOUT}s" --wait "${TIMEOUT}s" >&2
fi

wait_for() { # DESCRIPTION COMMAND...
  local what=$1; shift
  local deadline=$(( $(date +%s) + TIMEOUT ))
  until "$@" >/dev/null 2>&1; do
    if (( $(date +%s) > deadline )); then
      cluster_log "timed out after ${TIMEOUT}s waiting for ${what}"
      "$@" >&2 || true
      exit 1
    fi
    sleep 1
  done
}

wait_for "the API server" "${KUBECTL[@]}" get --raw /readyz

have=$("${KUBECTL[@]}" get nodes -o name | wc -l)
if (( have < NODES )); then
  cluster_log "adding $((NODES - have)) fake kwok node(s)"
  kwokctl_ scale node --replicas "${NODES}" >&2
fi
wait_for "${NODES} Ready node(s)" "${KUBECTL[@]}" wait --for=condition=Ready node --all --timeout=5s
# Pods are rejected until the token controller has made the default ServiceAccount.
wait_for "the default ServiceAccount" "${KUBECTL[@]}" -n default get serviceaccount default

cluster_log "cluster ${RELAY_CLUSTER_NAME} ready in $(( $(date +%s) - start ))s; kubeconfig: ${RELAY_KUBECONFIG}"
echo "${RELAY_KUBECONFIG}"
