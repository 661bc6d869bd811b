#!/usr/bin/env bash
# Build the local Kubernetes test control plane from official Go modules:
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl  (k8s.io/kubernetes)
#   etcd                                                               (go.etcd.io/etcd/server/v3)
#   helm                                                               (helm.sh/helm/v4)
#   kwok, kwokctl                                                      (sigs.k8s.io/kwok)
# into ${RELAY_TOOLS_CACHE:-~/.cache/smtp-relay-tools}/<component>-<version>/bin.
# A binary that is already there is not rebuilt; bumping a version in lib.sh
# changes the directory and so rebuilds that component only.
#
# Usage: hack/cluster/build.sh          build what is missing
#        hack/cluster/build.sh --path   print the PATH entries (after building)
# Env:   RELAY_TOOLS_CACHE, RELAY_TOOLS_THROWAWAY_GOCACHE=1 (see below)
# Needs only the Go toolchain (>= 1.26) and the Go module proxy.
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if ! command -v go >/dev/null 2>&1; then
  if [[ -x /usr/local/go/bin/go ]]; then PATH=$PATH:/usr/local/go/bin; else
    echo "build.sh: the go toolchain is not on PATH" >&2; exit 1; fi
fi

export CGO_ENABLED=0
export GOFLAGS="-trimpath -buildvcs=false"
LDFLAGS_BASE="-s -w"

mkdir -p "${RELAY_TOOLS_CACHE}"
# Serialise concurrent builds (e.g. CI and a developer shell).
if command -v flock >/dev/null 2>&1; then
  exec 9>"${RELAY_TOOLS_CACHE}/.build.lock"
  flock 9
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/relay-tools-build.XXXXXX")
trap 'chmod -R u+w "${TMP}" 2>/dev/null; rm -rf "${TMP}"' EXIT
# A cold build fills the Go build cache with ~5.6 GiB; set
# RELAY_TOOLS_THROWAWAY_GOCACHE=1 to use a temporary one that is deleted afterwards.
if [[ "${RELAY_TOOLS_THROWAWAY_GOCACHE:-0}" == 1 ]]; then export GOCACHE=${TMP}/gocache; fi

# missing DIR NAME... -> prints the names whose binary is absent from DIR
missing() {
  local dir=$1; shift
  local n
  for n in "$@"; do [[ -x "${dir}/${n}" ]] || echo "${n}"; done
}

# Copy a go.mod template to a scratch dir and check its pinned version.
prepare_module() { # NAME MODULE VERSION
  local name=$1 mod=$2 ver=$3
  local src=${CLUSTER_HACK_DIR}/gomod/${name}
  if ! grep -Eq "^[[:space:]]*(require[[:space:]]+)?${mod//./\\.} ${ver}([[:space:]]|$)" "${src}/go.mod"; then
    echo "build.sh: ${src}/go.mod does not pin ${mod} ${ver} (see lib.sh)" >&2
    exit 1
  fi
  mkdir -p "${TMP}/${name}"
  cp "${src}/go.mod" "${src}/go.sum" "${TMP}/${name}/"
  echo "${TMP}/${name}"
}

# Install OUT_DIR/NAME atomically from a file built in the scratch dir.
install_bin() { # SRC DEST
  chmod 0755 "$1"
  mv -f "$1" "$2.tmp.$$"
  mv -f "$2.tmp.$$" "$2"
}

build_k8s() {
  local need
  mapfile -t need < <(missing "${K8S_BIN}" kube-apiserver kube-controller-manager kube-scheduler kubectl)
  ((${#need[@]})) || { cluster_log "k8s ${KUBE_VERSION}: cached in ${K8S_BIN}"; return; }
  local dir ver=${KUBE_VERSION#v} major minor build_date ld n
  dir=$(prepare_module k8s k8s.io/kubernetes "${KUBE_VERSION}")
  major=${ver%%.*}; minor=${ver#*.}; minor=${minor%%.*}
  # Reproducible build date: the release's publication time on the module proxy.
  build_date=$(cd "${dir}" && go list -mod=readonly -m -f '{{if .Time}}{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}' k8s.io/kubernetes)
  ld=${LDFLAGS_BASE}
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X ${p}.gitVersion=${KUBE_VERSION} -X ${p}.gitMajor=${major} -X ${p}.gitMinor=${minor}"
    ld+=" -X ${p}.gitTreeState=clean -X ${p}.buildDate=${build_date:-1970-01-01T00:00:00Z}"
  done
  mkdir -p "${K8S_BIN}" "${dir}/out"
  for n in "${need[@]}"; do
    cluster_log "k8s ${KUBE_VERSION}: building ${n}"
    (cd "${dir}" && go build -mod=readonly -ldflags "${ld}" -o "out/${n}" "k8s.io/kubernetes/cmd/${n}")
    install_bin "${dir}/out/${n}" "${K8S_BIN}/${n}"
  done
}

build_etcd() {
  if [[ -z "$(missing "${ETCD_BIN}" etcd)" ]]; then cluster_log "etcd ${ETCD_VERSION}: cached in ${ETCD_BIN}"; return; fi
  local dir
  dir=$(prepare_module etcd go.etcd.io/etcd/server/v3 "${ETCD_VERSION}")
  mkdir -p "${ETCD_BIN}"
  cluster_log "etcd ${ETCD_VERSION}: building etcd"
  # The etcd server's main package is the root of the go.etcd.io/etcd/server/v3 module.
  (cd "${dir}" && go build -mod=readonly -ldflags "${LDFLAGS_BASE}" -o out/etcd go.etcd.io/etcd/server/v3)
  install_bin "${dir}/out/etcd" "${ETCD_BIN}/etcd"
}

# helm and kwok have no replace directives, so `go install pkg@version`
# builds them reproducibly from their own go.mod/go.sum.
build_helm() {
  if [[ -z "$(missing "${HELM_BIN}" helm)" ]]; then cluster_log "helm ${HELM_VERSION}: cached in ${HELM_BIN}"; return; fi
  local p=helm.sh/helm/v4/internal/version
  mkdir -p "${TMP}/helm-bin" "${HELM_BIN}"
  cluster_log "helm ${HELM_VERSION}: building helm"
  (cd "${TMP}" && GOBIN="${TMP}/helm-bin" go install \
    -ldflags "${LDFLAGS_BASE} -X ${p}.version=${HELM_VERSION} -X ${p}.metadata= -X ${p}.gitTreeState=clean" \
    "helm.sh/helm/v4/cmd/helm@${HELM_VERSION}")
  install_bin "${TMP}/helm-bin/helm" "${HELM_BIN}/helm"
}

build_kwok() {
  local need n p=sigs.k8s.io/kwok/pkg/consts
  mapfile -t need < <(missing "${KWOK_BIN}" kwok kwokctl)
  ((${#need[@]})) || { cluster_log "kwok ${KWOK_VERSION}: cached in ${KWOK_BIN}"; return; }
  mkdir -p "${TMP}/kwok-bin" "${KWOK_BIN}"
  for n in "${need[@]}"; do
    cluster_log "kwok ${KWOK_VERSION}: building ${n}"
    # KubeVersion is kwokctl's default Kubernetes version; match the binaries we build.
    (cd "${TMP}" && GOBIN="${TMP}/kwok-bin" go install \
      -ldflags "${LDFLAGS_BASE} -X ${p}.Version=${KWOK_VERSION#v} -X ${p}.KubeVersion=${KUBE_VERSION#v}" \
      "sigs.k8s.io/kwok/cmd/${n}@${KWOK_VERSION}")
    install_bin "${TMP}/kwok-bin/${n}" "${KWOK_BIN}/${n}"
  done
}

build_k8s
build_etcd
build_helm
build_kwok

if [[ "${1:-}" == "--path" ]]; then
  echo "${RELAY_TOOLS_PATH}"
else
  cluster_log "tools ready; add to PATH: ${RELAY_TOOLS_PATH}"
fi
