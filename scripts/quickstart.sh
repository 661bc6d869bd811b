#!/usr/bin/env bash
# The relay on its embedded defaults, with real mail through it:
#   SQLite queue in ./var/relay.db, delivered mail as .eml files in ./var/outbox,
#   SMTP on 127.0.0.1:2525, HTTP probes on 127.0.0.1:8080.
# Sets up .venv if needed, starts the relay, submits one message over SMTP, shows where it
# was delivered, then keeps the relay running until Ctrl-C (SIGTERM drains it gracefully).
set -euo pipefail
cd "$(dirname "$0")/.."

make -s venv
export RELAY_LOG__FORMAT="${RELAY_LOG__FORMAT:-text}"

.venv/bin/smtp-relay serve &
relay=$!
trap 'kill -TERM "$relay" 2>/dev/null; wait "$relay"' EXIT
trap 'exit 0' INT TERM

queue_id=$(.venv/bin/python - <<'PY'
import smtplib, socket, sys, time

deadline = time.monotonic() + 30
while True:
    try:
        socket.create_connection(("127.0.0.1", 2525), timeout=1).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("the relay did not start listening on 127.0.0.1:2525")
        time.sleep(0.2)

message = (
    "From: Clinic <clinic@example.org>\r\n"
    "To: Patient <patient@example.net>\r\n"
    "Subject: Appointment reminder\r\n"
    "\r\n"
    "Your appointment is tomorrow at 09:30.\r\n"
)
with smtplib.SMTP("127.0.0.1", 2525) as client:
    client.ehlo("quickstart.example")
    client.mail("clinic@example.org")
    client.rcpt("patient@example.net")
    code, reply = client.data(message.encode())
print(reply.decode().rsplit(" ", 1)[1])
PY
)
echo
echo "== accepted: queue id $queue_id"

for _ in $(seq 1 50); do
    [ -f "var/outbox/$queue_id.eml" ] && break
    sleep 0.2
done
echo "== delivered to var/outbox/$queue_id.eml:"
cat "var/outbox/$queue_id.eml"
echo
echo "== per-recipient outcome (smtp-relay queue show $queue_id):"
.venv/bin/smtp-relay queue show "$queue_id"
echo
echo "== queue (smtp-relay queue status):"
.venv/bin/smtp-relay queue status
echo
echo "The relay keeps running: SMTP 127.0.0.1:2525, readiness http://127.0.0.1:8080/readyz."
echo "Send more mail (e.g. swaks --server 127.0.0.1:2525 --to you@example.net). Ctrl-C stops it."
wait "$relay"
