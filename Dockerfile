# Two images from one build: `relay` (the SMTP relay) and `operator` (its Kubernetes
# operator). Both run as the unprivileged user 10001 on a pinned slim Python base.
#   docker build --target relay -t smtp-relay:0.1.0 .
#   docker build --target operator -t smtp-relay-operator:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# Build the package (relay and relay_operator) into a virtualenv that the final stages
# copy whole, so no compiler, pip cache or source tree reaches them.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY relay ./relay
COPY operator ./operator
RUN /opt/venv/bin/pip install --no-cache-dir .

FROM ${PYTHON_IMAGE} AS base
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# A fixed uid/gid: the pods' securityContext (runAsUser/fsGroup 10001) and mounted Secret
# file modes (0440) assume it.
RUN groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid relay --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin relay \
    && mkdir -p /var/lib/smtp-relay \
    && chown 10001:10001 /var/lib/smtp-relay
COPY --from=build /opt/venv /opt/venv
WORKDIR /var/lib/smtp-relay
USER 10001:10001

FROM base AS operator
# kopf's liveness endpoint.
EXPOSE 8081
CMD ["smtp-relay-operator", "run"]

# Last, so that a plain `docker build .` gives the relay.
FROM base AS relay
EXPOSE 2525 8080
CMD ["smtp-relay", "serve"]
