"""Plain-SQL migrations: `storage/migrations/NNNN_name.sql`, each applied in one transaction and recorded in
`monitoring.schema_migrations` with a checksum, so an applied file that was edited afterwards is refused.

Concurrent starters (the dashboard and `tsbot db migrate` at once) serialise on an advisory lock.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

MIGRATION_LOCK_KEY = 0x74_73_62_6F_74_6D  # "tsbotm"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def filename(self) -> str:
        return f"{self.version:04d}_{self.name}.sql"


def available_migrations() -> list[Migration]:
    found: dict[int, Migration] = {}
    for entry in (resources.files("storage") / "migrations").iterdir():
        match = _NAME.match(entry.name)
        if not match:
            continue
        version = int(match.group(1))
        if version in found:
            raise MigrationError(
                f"two migrations numbered {version:04d}: {found[version].filename}, {entry.name}"
            )
        found[version] = Migration(version, match.group(2), entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def applied_versions(conn: asyncpg.Connection) -> dict[int, str]:
    """Version -> checksum of what this database has applied (empty when never migrated)."""
    exists = await conn.fetchval("SELECT to_regclass('monitoring.schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, checksum FROM monitoring.schema_migrations")
    return {row["version"]: row["checksum"] for row in rows}


async def apply_migrations(conn: asyncpg.Connection) -> list[Migration]:
    """Apply what is missing; returns the migrations applied now (empty: already up to date)."""
    migrations = available_migrations()
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """
            CREATE SCHEMA IF NOT EXISTS monitoring;
            CREATE TABLE IF NOT EXISTS monitoring.schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                checksum   text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            );
            """
        )
        applied = await applied_versions(conn)
        newly_applied = []
        for migration in migrations:
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"{migration.filename} was changed after it was applied to this database; "
                        "add a new migration instead of editing an applied one"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO monitoring.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            newly_applied.append(migration)
        unknown = sorted(set(applied) - {m.version for m in migrations})
        if unknown:
            raise MigrationError(
                f"this database has migrations this version does not know ({', '.join(map(str, unknown))}): "
                "it was migrated by a newer tsbot"
            )
        return newly_applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
