#!/usr/bin/env bash
# Print shell exports for the local test cluster's tools and kubeconfig:
#   eval "$(hack/cluster/env.sh)"
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
printf 'export PATH=%q\n' "${RELAY_TOOLS_PATH}:${PATH}"
printf 'export KUBECONFIG=%q\n' "${RELAY_KUBECONFIG}"
