"""Benchmarks of the relay against Postfix on the same machine (issue 9).

`python -m bench.run all` starts every server itself on 127.0.0.1 in a temporary directory
(a private MariaDB, a private held Postfix, smtp-sink, an HTTP sink playing Mailgun, the
relay as a subprocess), measures, and writes `bench/results/<timestamp>.json`. What each
figure means and what bounds it is in docs/benchmarks.md.
"""
