"""smtp-relay: accepts mail over SMTP, queues it durably, delivers it through providers."""

__version__ = "0.1.0"
