"""Bounces, provider events and the suppression list (runbook 4.3).

How a bounce reaches the relay, one module each:

- `verp`: the return path of every sent message names its queue id and recipient row,
  tagged with an HMAC, so a delivery status notification is attributed from its envelope.
- `dsn`: reads what arrives at those addresses: RFC 3464 reports and the prose bounces of
  MTAs that do not send them.
- `mailgun_events`: Mailgun's signed webhook events.
- `classify`: one rule for hard and soft, whatever the source.
- `suppression`: applies bounces to the queue and the `recipients` list, answers RCPT for
  suppressed addresses, and serves the admin API and CLI.

This package's `__init__` imports nothing, so that the queue can use `relay.bounces.model`
without an import cycle.
"""
