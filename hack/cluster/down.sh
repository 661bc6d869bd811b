#!/usr/bin/env bash
# Stop the local test cluster started by up.sh and remove all of its runtime
# state (etcd data, certificates, logs, kubeconfig). The built binaries in
# ${RELAY_TOOLS_CACHE} are kept.
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

export KWOK_WORKDIR=${RELAY_CLUSTER_DIR}/kwok
KWOKCTL=${KWOK_BIN}/kwokctl

if [[ -x "${KWOKCTL}" && -d "${KWOK_WORKDIR}/clusters/${RELAY_CLUSTER_NAME}" ]]; then
  cluster_log "deleting cluster ${RELAY_CLUSTER_NAME}"
  # kwokctl stops each component process (by its pid file) and removes the
  # cluster's directory; --kubeconfig removes its context from our kubeconfig.
  "${KWOKCTL}" delete cluster --name "${RELAY_CLUSTER_NAME}" \
    --kubeconfig "${RELAY_KUBECONFIG}" >&2 || cluster_log "kwokctl delete cluster failed; removing state anyway"
fi
rm -rf "${RELAY_CLUSTER_DIR}"
cluster_log "removed ${RELAY_CLUSTER_DIR}"
