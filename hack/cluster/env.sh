#!/usr/bin/env bash
# Print shell exports for the local test cluster's tools and kubeconfig:
#   eval "$(hack/cluster/env.sh)"
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck disable=SC2016  # $PATH is expanded by the shell that evals this
printf 'export PATH=%q:"$PATH"\n' "${RELAY_TOOLS_PATH}"
printf 'export KUBECONFIG=%q\n' "${RELAY_KUBECONFIG}"
printf 'export KUBECACHEDIR=%q\n' "${RELAY_CLUSTER_DIR}/kube-cache"
