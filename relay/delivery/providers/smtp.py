"""The smarthost provider: hands mail to another MTA over SMTP (aiosmtplib).

STARTTLS is required unless configured otherwise: a relay for health mail must not fall back
to plaintext because a man in the middle stripped the STARTTLS capability. Connections are
pooled and reused for later messages, as Postfix's connection cache does.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence

import aiosmtplib

from relay.config import SmtpProviderSettings
from relay.delivery.providers.base import Envelope, Outcome, ProviderError, RecipientResult

# Only these MAIL parameters describe the message itself; SIZE is the peer's to check anew
# and AUTH= belongs to the client's own submission.
_FORWARDED_MAIL_OPTIONS = ("BODY=", "SMTPUTF8")


def _classify(code: int) -> Outcome:
    return Outcome.PERMANENT if 500 <= code < 600 else Outcome.TRANSIENT


class SmtpProvider:
    def __init__(self, name: str, settings: SmtpProviderSettings) -> None:
        self.name = name
        self.settings = settings
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots = asyncio.Semaphore(settings.max_connections)

    def _client(self) -> aiosmtplib.SMTP:
        s = self.settings
        tls_context = None
        if s.tls != "none":
            tls_context = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
            if not s.verify_certificate:
                tls_context.check_hostname = False
                tls_context.verify_mode = ssl.CERT_NONE
        return aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            use_tls=s.tls == "implicit",
            start_tls={"starttls": True, "opportunistic": None}.get(s.tls, False),
            tls_context=tls_context,
            username=s.username,
            password=s.resolved_password(),
            timeout=s.timeout.total_seconds(),
            local_hostname=s.local_hostname,
        )

    async def _connect(self) -> aiosmtplib.SMTP:
        client = self._client()
        try:
            await client.connect()
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise ProviderError(
                f"{self.name}: authentication rejected ({exc.code})", transient=False
            ) from exc
        except aiosmtplib.SMTPResponseException as exc:
            raise ProviderError(f"{self.name}: {exc.code} {exc.message}") from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise ProviderError(f"{self.name}: cannot connect: {_brief(exc)}") from exc
        return client

    async def send(self, envelope: Envelope, content: bytes) -> Sequence[RecipientResult]:
        async with self._slots:
            reused = bool(self._idle)
            client = self._idle.pop() if reused else await self._connect()
            try:
                results = await self._transaction(client, envelope, content)
            except aiosmtplib.SMTPServerDisconnected:
                await _discard(client)
                if not reused:
                    raise ProviderError(f"{self.name}: connection lost") from None
                # A cached connection the peer had already closed: one fresh try.
                client = await self._connect()
                try:
                    results = await self._transaction(client, envelope, content)
                except aiosmtplib.SMTPServerDisconnected:
                    await _discard(client)
                    raise ProviderError(f"{self.name}: connection lost") from None
            except BaseException:
                await _discard(client)
                raise
            self._idle.append(client)
            return results

    async def _transaction(
        self, client: aiosmtplib.SMTP, envelope: Envelope, content: bytes
    ) -> list[RecipientResult]:
        options = [
            option
            for option in envelope.mail_options
            if option.upper().startswith(_FORWARDED_MAIL_OPTIONS)
        ]
        try:
            refused, reply = await client.sendmail(
                envelope.mail_from, list(envelope.rcpt_tos), content, mail_options=options
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            by_address = {err.recipient: err for err in exc.recipients}
            return [
                RecipientResult(
                    address,
                    _classify(by_address[address].code)
                    if address in by_address
                    else Outcome.TRANSIENT,
                    _reply_text(by_address[address]) if address in by_address else "refused",
                )
                for address in envelope.rcpt_tos
            ]
        except aiosmtplib.SMTPServerDisconnected:
            raise
        except aiosmtplib.SMTPResponseException as exc:
            # Sender refused or DATA refused: one verdict for every recipient.
            outcome = _classify(exc.code)
            detail = _reply_text(exc)
            await _reset_quietly(client)
            return [RecipientResult(a, outcome, detail) for a in envelope.rcpt_tos]
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise ProviderError(f"{self.name}: {_brief(exc)}") from exc
        return [
            RecipientResult(
                address, _classify(refused[address].code), _reply_text(refused[address])
            )
            if address in refused
            else RecipientResult(address, Outcome.DELIVERED, reply, _queue_id_from(reply))
            for address in envelope.rcpt_tos
        ]

    async def check(self) -> None:
        client = await self._connect()
        try:
            code, message = await client.noop()
            if code != 250:
                raise ProviderError(f"{self.name}: NOOP answered {code} {message}")
        finally:
            await _discard(client)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            await _discard(client)


def _reply_text(exc: aiosmtplib.SMTPResponseException | aiosmtplib.SMTPResponse) -> str:
    return f"{exc.code} {exc.message}"


def _brief(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__


def _queue_id_from(reply: str) -> str | None:
    # "250 2.0.0 Ok: queued as 4Xyz" (Postfix) and most MTAs end with the peer's queue id.
    words = reply.split()
    return words[-1][:255] if words else None


async def _reset_quietly(client: aiosmtplib.SMTP) -> None:
    try:
        await client.rset()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        client.close()


async def _discard(client: aiosmtplib.SMTP) -> None:
    try:
        if client.is_connected:
            await asyncio.wait_for(client.quit(), timeout=2)
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        pass
    finally:
        client.close()
