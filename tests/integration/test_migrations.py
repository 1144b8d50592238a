"""Migrations against a real embedded PostgreSQL."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from storage.embedded import EmbeddedPostgres
from storage.migrator import MigrationError, apply_migrations, available_migrations

CATALOG_SNAPSHOT = """
SELECT table_name, column_name, data_type, is_nullable, column_default
FROM information_schema.columns WHERE table_schema = 'monitoring'
ORDER BY table_name, ordinal_position
"""


async def test_migrating_an_empty_database_twice_is_a_no_op_the_second_time(
    pg_server: EmbeddedPostgres, empty_database: str
) -> None:
    conn = await asyncpg.connect(pg_server.dsn(empty_database))
    try:
        first = await apply_migrations(conn)
        catalog_after_first = await conn.fetch(CATALOG_SNAPSHOT)
        recorded_after_first = await conn.fetch("SELECT * FROM monitoring.schema_migrations ORDER BY version")

        second = await apply_migrations(conn)

        assert [m.version for m in first] == [m.version for m in available_migrations()]
        assert first, "an empty database must receive every migration"
        assert second == []
        assert await conn.fetch(CATALOG_SNAPSHOT) == catalog_after_first
        assert (
            await conn.fetch("SELECT * FROM monitoring.schema_migrations ORDER BY version")
            == recorded_after_first
        )
    finally:
        await conn.close()


async def test_concurrent_migrators_apply_each_migration_once(
    pg_server: EmbeddedPostgres, empty_database: str
) -> None:
    conns = [await asyncpg.connect(pg_server.dsn(empty_database)) for _ in range(3)]
    try:
        results = await asyncio.gather(*(apply_migrations(c) for c in conns))
        applied_counts = sorted(len(r) for r in results)
        assert applied_counts == [0, 0, len(available_migrations())]
        assert await conns[0].fetchval("SELECT count(*) FROM monitoring.schema_migrations") == len(
            available_migrations()
        )
    finally:
        for conn in conns:
            await conn.close()


async def test_an_applied_migration_edited_afterwards_is_refused(
    pg_server: EmbeddedPostgres, migrated_database: str
) -> None:
    conn = await asyncpg.connect(pg_server.dsn(migrated_database))
    try:
        await conn.execute("UPDATE monitoring.schema_migrations SET checksum = 'edited' WHERE version = 1")
        with pytest.raises(MigrationError, match=r"0001_monitoring\.sql was changed after it was applied"):
            await apply_migrations(conn)
    finally:
        await conn.close()


async def test_a_database_from_a_newer_version_is_refused(
    pg_server: EmbeddedPostgres, migrated_database: str
) -> None:
    conn = await asyncpg.connect(pg_server.dsn(migrated_database))
    try:
        await conn.execute(
            "INSERT INTO monitoring.schema_migrations (version, name, checksum) VALUES (9999, 'future', 'x')"
        )
        with pytest.raises(MigrationError, match="migrated by a newer tsbot"):
            await apply_migrations(conn)
    finally:
        await conn.close()


async def test_embedded_server_listens_on_a_unix_socket_only(pg_server: EmbeddedPostgres) -> None:
    conn = await asyncpg.connect(pg_server.dsn("postgres"))
    try:
        assert await conn.fetchval("SHOW listen_addresses") == ""
        assert await conn.fetchval("SHOW unix_socket_directories") == str(pg_server.socket_dir)
    finally:
        await conn.close()


async def test_processes_creating_the_database_at_once_all_find_it(pg_server: EmbeddedPostgres) -> None:
    """`tsbot run` and `tsbot signals import` started together on a fresh embedded server both created the
    database: the one that lost the race died with "tsbot run: internal error" and a traceback. PostgreSQL
    reports that loss as a unique violation on `pg_database`, not always as "database already exists".
    Every creator finds the database, exactly one of them made it, and none fails."""
    from storage.database import ensure_database_exists

    admin = pg_server.dsn("postgres")
    made = []
    try:
        for round_ in range(8):
            name = f"race_{round_}_{id(made)}"
            made.append(name)
            results = await asyncio.gather(
                *(ensure_database_exists(admin, name) for _ in range(6)), return_exceptions=True
            )
            failures = [r for r in results if isinstance(r, BaseException)]
            assert failures == [], failures
            assert results.count(True) == 1, results
    finally:
        conn = await asyncpg.connect(admin)
        try:
            for name in made:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        finally:
            await conn.close()
