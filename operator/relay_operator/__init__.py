"""The Kubernetes operator for smtp-relay: custom resources in, relay Deployments out."""

__version__ = "0.1.0"
