# shellcheck shell=bash disable=SC2034  # variables are used by the scripts that source this
# Shared settings for hack/cluster/{build,up,down,env}.sh. Source, don't run.
#
# Pinned tool versions. Bumping one changes its cache key, so build.sh rebuilds
# only that component. KUBE_VERSION and ETCD_VERSION must match the go.mod
# templates in hack/cluster/gomod/{k8s,etcd}/ (build.sh checks this).
KUBE_VERSION=v1.37.2   # k8s.io/kubernetes; staging modules k8s.io/* v0.37.2
ETCD_VERSION=v3.7.0    # go.etcd.io/etcd/server/v3 (the etcd that kubernetes v1.37 is tested with)
HELM_VERSION=v4.3.2    # helm.sh/helm/v4
KWOK_VERSION=v0.8.0    # sigs.k8s.io/kwok (kwok controller + kwokctl)

CLUSTER_HACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RELAY_TOOLS_CACHE=${RELAY_TOOLS_CACHE:-${HOME}/.cache/smtp-relay-tools}
RELAY_CLUSTER_DIR=${RELAY_CLUSTER_DIR:-${HOME}/.cache/smtp-relay-cluster}
RELAY_CLUSTER_NAME=${RELAY_CLUSTER_NAME:-smtp-relay}

# One bin dir per component, keyed by version.
K8S_BIN=${RELAY_TOOLS_CACHE}/k8s-${KUBE_VERSION}/bin
ETCD_BIN=${RELAY_TOOLS_CACHE}/etcd-${ETCD_VERSION}/bin
HELM_BIN=${RELAY_TOOLS_CACHE}/helm-${HELM_VERSION}/bin
KWOK_BIN=${RELAY_TOOLS_CACHE}/kwok-${KWOK_VERSION}-k8s-${KUBE_VERSION}/bin
RELAY_TOOLS_PATH=${K8S_BIN}:${ETCD_BIN}:${HELM_BIN}:${KWOK_BIN}

RELAY_KUBECONFIG=${RELAY_CLUSTER_DIR}/kubeconfig

cluster_log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
