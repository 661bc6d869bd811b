"""Versioned schema migrations, one list per dialect.

Table and column names follow the runbook (messages, recipients, message_recipients,
audit_log) so its queries keep working; indexes include the ones of runbook section 7.1.
Migrations only ever append: a released version is never edited, a change is a new version.

Raw message bytes live in `message_contents`, not in `messages`, so the rows that claims
and status queries scan stay small however large the mail is.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


MYSQL: tuple[Migration, ...] = (
    Migration(
        1,
        "initial queue schema",
        (
            """
            CREATE TABLE IF NOT EXISTS messages (
                id VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
                workspace_id VARCHAR(255) NOT NULL,
                from_email VARCHAR(512) NOT NULL,
                to_emails MEDIUMTEXT NOT NULL,
                subject TEXT NULL,
                status VARCHAR(16) NOT NULL,
                error TEXT NULL,
                retry_count INT NOT NULL DEFAULT 0,
                size_bytes INT NOT NULL,
                mail_options VARCHAR(255) NOT NULL DEFAULT '',
                client_address VARCHAR(64) NULL,
                queued_at DATETIME(6) NOT NULL,
                processed_at DATETIME(6) NULL,
                next_attempt_at DATETIME(6) NOT NULL,
                claimed_by VARCHAR(128) NULL,
                claim_expires_at DATETIME(6) NULL,
                INDEX idx_status_queued (status, queued_at),
                INDEX idx_workspace_status_queued (workspace_id, status, queued_at),
                INDEX idx_status_next_attempt (status, next_attempt_at),
                INDEX idx_status_claim_expires (status, claim_expires_at)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
            """,
            """
            CREATE TABLE IF NOT EXISTS message_contents (
                message_id VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
                raw LONGBLOB NOT NULL,
                CONSTRAINT fk_contents_message FOREIGN KEY (message_id)
                    REFERENCES messages (id) ON DELETE CASCADE
            ) ENGINE=InnoDB
            """,
            """
            CREATE TABLE IF NOT EXISTS message_recipients (
                id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
                message_id VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
                email_address VARCHAR(320) NOT NULL,
                delivery_status VARCHAR(16) NOT NULL,
                error TEXT NULL,
                bounce_reason TEXT NULL,
                attempts INT NOT NULL DEFAULT 0,
                provider VARCHAR(64) NULL,
                provider_message_id VARCHAR(255) NULL,
                sent_at DATETIME(6) NULL,
                updated_at DATETIME(6) NOT NULL,
                INDEX idx_message (message_id),
                INDEX idx_sent_status (sent_at, delivery_status),
                CONSTRAINT fk_recipients_message FOREIGN KEY (message_id)
                    REFERENCES messages (id) ON DELETE CASCADE
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
            """,
            """
            CREATE TABLE IF NOT EXISTS recipients (
                id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
                workspace_id VARCHAR(255) NOT NULL,
                email_address VARCHAR(320) NOT NULL,
                status VARCHAR(16) NOT NULL DEFAULT 'ACTIVE',
                bounce_type VARCHAR(8) NULL,
                bounce_count INT NOT NULL DEFAULT 0,
                last_bounce_date DATETIME(6) NULL,
                created_at DATETIME(6) NOT NULL,
                updated_at DATETIME(6) NOT NULL,
                UNIQUE INDEX idx_email_workspace (email_address, workspace_id),
                INDEX idx_workspace_status (workspace_id, status)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
            """,
            """
            CREATE TABLE IF NOT EXISTS audit_log (
                id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
                user_id VARCHAR(255) NULL,
                action VARCHAR(128) NOT NULL,
                ip_address VARCHAR(64) NULL,
                outcome VARCHAR(32) NOT NULL,
                detail TEXT NULL,
                created_at DATETIME(6) NOT NULL,
                INDEX idx_created (created_at)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
            """,
        ),
    ),
)

MYSQL += (
    Migration(
        2,
        "daily quotas and temporary rate-limit overrides",
        (
            """
            CREATE TABLE IF NOT EXISTS quota_usage (
                workspace_id VARCHAR(255) NOT NULL,
                subject VARCHAR(320) NOT NULL,
                day CHAR(10) CHARACTER SET ascii NOT NULL,
                used INT NOT NULL DEFAULT 0,
                PRIMARY KEY (workspace_id, subject, day)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
            """,
            """
            CREATE TABLE IF NOT EXISTS rate_limit_overrides (
                workspace_id VARCHAR(255) NOT NULL PRIMARY KEY,
                workspace_daily INT NULL,
                per_user_daily INT NULL,
                rate_limit_burst INT NULL,
                rate_limit_refill DOUBLE NULL,
                expires_at DATETIME(6) NOT NULL,
                created_by VARCHAR(255) NULL,
                created_at DATETIME(6) NOT NULL
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
            """,
        ),
    ),
)


MYSQL += (
    Migration(
        3,
        "bounce processing: webhook replay protection, suppressions, bounce history",
        (
            # Ids that may be processed once (Mailgun tokens and events, inbound reports),
            # kept in the database so that every replica agrees; pruned after expires_at.
            """
            CREATE TABLE IF NOT EXISTS webhook_events (
                source VARCHAR(32) CHARACTER SET ascii NOT NULL,
                event_key VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
                received_at DATETIME(6) NOT NULL,
                expires_at DATETIME(6) NOT NULL,
                PRIMARY KEY (source, event_key),
                INDEX idx_webhook_events_expires (expires_at)
            ) ENGINE=InnoDB
            """,
            # Why an address is INACTIVE; recipients.status is what RCPT checks, so the
            # runbook's own clean-up (which writes only that) still suppresses.
            """
            CREATE TABLE IF NOT EXISTS suppressions (
                workspace_id VARCHAR(255) NOT NULL,
                email_address VARCHAR(320) NOT NULL,
                reason VARCHAR(32) NOT NULL,
                detail TEXT NULL,
                created_by VARCHAR(255) NULL,
                created_at DATETIME(6) NOT NULL,
                PRIMARY KEY (email_address, workspace_id),
                INDEX idx_suppressions_workspace (workspace_id, created_at)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
            """,
            # Every bounce, complaint and delivery event applied: recipients keeps only
            # the running count, this keeps what happened. No foreign key: messages are
            # purged after 90 days (runbook 6.1), their history is not.
            """
            CREATE TABLE IF NOT EXISTS bounce_events (
                id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
                workspace_id VARCHAR(255) NOT NULL,
                email_address VARCHAR(320) NOT NULL,
                message_id VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NULL,
                recipient_row_id BIGINT NULL,
                source VARCHAR(16) NOT NULL,
                bounce_type VARCHAR(16) NOT NULL,
                status VARCHAR(16) NULL,
                reason TEXT NULL,
                created_at DATETIME(6) NOT NULL,
                INDEX idx_bounce_events_address (email_address, workspace_id),
                INDEX idx_bounce_events_created (created_at)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
            """,
        ),
    ),
)


SQLITE: tuple[Migration, ...] = (
    Migration(
        1,
        "initial queue schema",
        (
            """
            CREATE TABLE IF NOT EXISTS messages (
                id TEXT NOT NULL PRIMARY KEY,
                workspace_id TEXT NOT NULL,
                from_email TEXT NOT NULL,
                to_emails TEXT NOT NULL,
                subject TEXT NULL,
                status TEXT NOT NULL,
                error TEXT NULL,
                retry_count INTEGER NOT NULL DEFAULT 0,
                size_bytes INTEGER NOT NULL,
                mail_options TEXT NOT NULL DEFAULT '',
                client_address TEXT NULL,
                queued_at TEXT NOT NULL,
                processed_at TEXT NULL,
                next_attempt_at TEXT NOT NULL,
                claimed_by TEXT NULL,
                claim_expires_at TEXT NULL
            ) WITHOUT ROWID
            """,
            "CREATE INDEX IF NOT EXISTS idx_status_queued ON messages (status, queued_at)",
            """CREATE INDEX IF NOT EXISTS idx_workspace_status_queued
               ON messages (workspace_id, status, queued_at)""",
            """CREATE INDEX IF NOT EXISTS idx_status_next_attempt
               ON messages (status, next_attempt_at)""",
            """CREATE INDEX IF NOT EXISTS idx_status_claim_expires
               ON messages (status, claim_expires_at)""",
            """
            CREATE TABLE IF NOT EXISTS message_contents (
                message_id TEXT NOT NULL PRIMARY KEY
                    REFERENCES messages (id) ON DELETE CASCADE,
                raw BLOB NOT NULL
            )
            """,
            """
            CREATE TABLE IF NOT EXISTS message_recipients (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                message_id TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
                email_address TEXT NOT NULL,
                delivery_status TEXT NOT NULL,
                error TEXT NULL,
                bounce_reason TEXT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                provider TEXT NULL,
                provider_message_id TEXT NULL,
                sent_at TEXT NULL,
                updated_at TEXT NOT NULL
            )
            """,
            "CREATE INDEX IF NOT EXISTS idx_message ON message_recipients (message_id)",
            """CREATE INDEX IF NOT EXISTS idx_sent_status
               ON message_recipients (sent_at, delivery_status)""",
            """
            CREATE TABLE IF NOT EXISTS recipients (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                workspace_id TEXT NOT NULL,
                email_address TEXT NOT NULL,
                status TEXT NOT NULL DEFAULT 'ACTIVE',
                bounce_type TEXT NULL,
                bounce_count INTEGER NOT NULL DEFAULT 0,
                last_bounce_date TEXT NULL,
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL
            )
            """,
            """CREATE UNIQUE INDEX IF NOT EXISTS idx_email_workspace
               ON recipients (email_address, workspace_id)""",
            """CREATE INDEX IF NOT EXISTS idx_workspace_status
               ON recipients (workspace_id, status)""",
            """
            CREATE TABLE IF NOT EXISTS audit_log (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                user_id TEXT NULL,
                action TEXT NOT NULL,
                ip_address TEXT NULL,
                outcome TEXT NOT NULL,
                detail TEXT NULL,
                created_at TEXT NOT NULL
            )
            """,
            "CREATE INDEX IF NOT EXISTS idx_created ON audit_log (created_at)",
        ),
    ),
)


SQLITE += (
    Migration(
        2,
        "daily quotas and temporary rate-limit overrides",
        (
            """
            CREATE TABLE IF NOT EXISTS quota_usage (
                workspace_id TEXT NOT NULL,
                subject TEXT NOT NULL,
                day TEXT NOT NULL,
                used INTEGER NOT NULL DEFAULT 0,
                PRIMARY KEY (workspace_id, subject, day)
            )
            """,
            """
            CREATE TABLE IF NOT EXISTS rate_limit_overrides (
                workspace_id TEXT NOT NULL PRIMARY KEY,
                workspace_daily INTEGER NULL,
                per_user_daily INTEGER NULL,
                rate_limit_burst INTEGER NULL,
                rate_limit_refill REAL NULL,
                expires_at TEXT NOT NULL,
                created_by TEXT NULL,
                created_at TEXT NOT NULL
            )
            """,
        ),
    ),
)


SQLITE += (
    Migration(
        3,
        "bounce processing: webhook replay protection, suppressions, bounce history",
        (
            """
            CREATE TABLE IF NOT EXISTS webhook_events (
                source TEXT NOT NULL,
                event_key TEXT NOT NULL,
                received_at TEXT NOT NULL,
                expires_at TEXT NOT NULL,
                PRIMARY KEY (source, event_key)
            ) WITHOUT ROWID
            """,
            """CREATE INDEX IF NOT EXISTS idx_webhook_events_expires
               ON webhook_events (expires_at)""",
            """
            CREATE TABLE IF NOT EXISTS suppressions (
                workspace_id TEXT NOT NULL,
                email_address TEXT NOT NULL,
                reason TEXT NOT NULL,
                detail TEXT NULL,
                created_by TEXT NULL,
                created_at TEXT NOT NULL,
                PRIMARY KEY (email_address, workspace_id)
            ) WITHOUT ROWID
            """,
            """CREATE INDEX IF NOT EXISTS idx_suppressions_workspace
               ON suppressions (workspace_id, created_at)""",
            """
            CREATE TABLE IF NOT EXISTS bounce_events (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                workspace_id TEXT NOT NULL,
                email_address TEXT NOT NULL,
                message_id TEXT NULL,
                recipient_row_id INTEGER NULL,
                source TEXT NOT NULL,
                bounce_type TEXT NOT NULL,
                status TEXT NULL,
                reason TEXT NULL,
                created_at TEXT NOT NULL
            )
            """,
            """CREATE INDEX IF NOT EXISTS idx_bounce_events_address
               ON bounce_events (email_address, workspace_id)""",
            """CREATE INDEX IF NOT EXISTS idx_bounce_events_created
               ON bounce_events (created_at)""",
        ),
    ),
)


# Version 3 is the bounce-processing schema (relay/bounces); 4 is appended after it.
MYSQL_STATE = Migration(
    4,
    "service-wide state: maintenance mode",
    (
        """
        CREATE TABLE IF NOT EXISTS relay_state (
            name VARCHAR(64) NOT NULL PRIMARY KEY,
            value TEXT NOT NULL,
            updated_by VARCHAR(255) NULL,
            updated_at DATETIME(6) NOT NULL
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
        """,
    ),
)
SQLITE_STATE = Migration(
    4,
    "service-wide state: maintenance mode",
    (
        """
        CREATE TABLE IF NOT EXISTS relay_state (
            name TEXT NOT NULL PRIMARY KEY,
            value TEXT NOT NULL,
            updated_by TEXT NULL,
            updated_at TEXT NOT NULL
        )
        """,
    ),
)


def pending(applied: set[int], migrations: tuple[Migration, ...]) -> list[Migration]:
    return [m for m in migrations if m.version not in applied]
