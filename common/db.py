"""Database engines and migrations, the same for every service that owns tables.

SQLite (aiosqlite) by default, PostgreSQL (psycopg 3) when the URL says `postgresql+psycopg`.
Each service has its own alembic history (`<service>/migrations`), applied on start.

PostgreSQL may sit behind a pooler in transaction mode (PgBouncer, Neon's pooled endpoints):
consecutive transactions of one client connection may then run on different server sessions,
so nothing on the request path keeps session state. psycopg's automatic server-side prepared
statements are off (`prepare_threshold=None`), no request sets a session parameter or takes
an advisory lock. Migrations do need a session (they hold an advisory lock while they run):
they connect with `<SERVICE>_DATABASE_MIGRATION_URL` (a direct connection) when it is set.
Query parameters of a URL (`sslmode=require`, `channel_binding`, `options`, ...) go to libpq.

The hot path is cheap in round trips (bench/NOTES.md): on PostgreSQL a read or a write that is
one statement runs on `single_statements(engine)`, in autocommit (no BEGIN/COMMIT round trips,
no ROLLBACK when the connection goes back to the pool); a connection is pinged before use only
when it has sat idle in the pool for a while (`PING_AFTER_IDLE_SECONDS`), not on every checkout.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Table, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from common import metrics
from common.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # where `python -m common.migrate` finds `common`


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


# psycopg's keyword arguments for every service connection (psycopg.AsyncConnection.connect).
# prepare_threshold=None: never prepare statements on the server. psycopg otherwise prepares a
# statement on its 6th run on a connection (as "_pg3_0", ...); behind a transaction-mode pooler
# the next transaction may run on another server session, which then lacks it
# (InvalidSqlStatementName) or already holds that name from another client (DuplicatePreparedStatement).
# The cost on a direct connection is a parse and plan per statement, small for these queries.
POSTGRES_CONNECT_ARGS: dict[str, Any] = {"prepare_threshold": None}


def create_engine(url: str, pool_size: int = 10) -> AsyncEngine:
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        # aiosqlite's default BEGIN is deferred; take the write lock up front so two
        # writers never deadlock upgrading read locks (they queue on busy_timeout instead).
        event.listen(engine.sync_engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine
    engine = create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=1800,
        connect_args=POSTGRES_CONNECT_ARGS,
    )
    _ping_when_idle(engine)
    return engine


def single_statements(engine: AsyncEngine) -> AsyncEngine:
    """The engine for work that is one statement (a read, or a write that is atomic on its own):
    on PostgreSQL in autocommit, which saves the BEGIN and COMMIT/ROLLBACK round trips; SQLite's
    engine as it is (its transactions are local and cheap). Same pool as `engine`."""
    if is_sqlite(str(engine.url)):
        return engine
    return engine.execution_options(isolation_level="AUTOCOMMIT")


# A connection idle in the pool for longer than this is checked (SELECT 1) before it is handed
# out; a busy pool never pays for it. After a PostgreSQL restart, a connection used within this
# window fails its request (as UNAVAILABLE) and SQLAlchemy then replaces every pooled
# connection older than the failure, so the next requests get fresh ones.
PING_AFTER_IDLE_SECONDS = 2.0


def _ping_when_idle(engine: AsyncEngine) -> None:
    """SQLAlchemy's pool_pre_ping pings on every checkout (a round trip per request); this is
    its documented "pessimistic" recipe, limited to connections that have been idle a while."""
    sync_engine = engine.sync_engine
    dialect = sync_engine.dialect

    @event.listens_for(sync_engine, "checkin")
    def _idle_from(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(sync_engine, "checkout")
    def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
            return
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as error:
            if dialect.is_disconnect(error, dbapi_connection, None):
                raise DisconnectionError("the pooled connection is gone") from error  # the pool retries
            raise


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy own transactions (see the "begin" listener above).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def migration_url(migrations_dir: Path, url: str, environ: Mapping[str, str] | None = None) -> str:
    """The URL the migrations of `<service>/migrations` run on: `<SERVICE>_DATABASE_MIGRATION_URL`
    (TASK_DATABASE_MIGRATION_URL for task_service, ...) when set, else the service's own `url`.

    The service URL may be a transaction-mode pooler, which cannot hold the migrations' session-level
    advisory lock; the migration URL is then a direct connection to the same database."""
    service = Path(migrations_dir).resolve().parent.name.removesuffix("_service")
    settings = Settings.load(None if environ is None else dict(environ))
    configured = getattr(settings, f"{service}_database_migration_url", "")
    return str(configured) or url


def sync_url(url: str) -> str:
    """The URL alembic runs with: the same database through a synchronous driver."""
    parsed = make_url(url)
    if parsed.drivername == "sqlite+aiosqlite":
        parsed = parsed.set(drivername="sqlite")
    return parsed.render_as_string(hide_password=False)


def migrate_sync(migrations_dir: Path, url: str) -> None:
    """Apply the migrations in this process (what `python -m common.migrate` runs)."""
    from alembic import command  # here, not at the top: the serving process never imports alembic
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir))
    config.attributes["database_url"] = sync_url(url)
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(config, "head")


class MigrationError(RuntimeError):
    """The service's migrations did not apply; the child's log lines above say why."""


async def migrate(migrations_dir: Path, url: str) -> None:
    """Apply the service's migrations up to head, in a child process (`common.migrate`).

    A child keeps alembic out of the serving process's memory and off its event loop; its log
    lines go to the service's stderr. An in-memory SQLite database would live in the child only,
    so it is refused."""
    if is_sqlite(url) and make_url(url).database in (None, "", ":memory:"):
        raise MigrationError("an in-memory SQLite database cannot be migrated in a child process; use a file")
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "common.migrate",
        str(migrations_dir),
        stdin=asyncio.subprocess.PIPE,
        cwd=PROJECT_ROOT,
    )
    await child.communicate(url.encode())
    if child.returncode != 0:
        raise MigrationError(f"the migrations in {migrations_dir} failed (exit status {child.returncode})")


@asynccontextmanager
async def migrated_engine(migrations_dir: Path, url: str, pool_size: int) -> AsyncIterator[AsyncEngine]:
    """A service's database for as long as it serves: migrated to head first, disposed after.

    Migrations run on the service's migration URL when one is set (see `migration_url`)."""
    await migrate(migrations_dir, migration_url(migrations_dir, url))
    engine = create_engine(url, pool_size)
    metrics.watch_pool(engine)  # todo_db_pool_* gauges, read from the pool at scrape time
    try:
        yield engine
    finally:
        await engine.dispose()


async def next_number(conn: AsyncConnection, counters: Table, user_id: str) -> int:
    """Bump and return the user's counter in `counters` (columns user_id, last_id).

    One atomic upsert: on PostgreSQL it row-locks the counter until the transaction commits,
    on SQLite the transaction holds the write lock; either way concurrent creates of one user
    get consecutive numbers, and a rolled-back create gives its number back.
    """
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(counters).values(user_id=user_id, last_id=1)
    statement = statement.on_conflict_do_update(
        index_elements=[counters.c.user_id], set_={"last_id": counters.c.last_id + 1}
    ).returning(counters.c.last_id)
    return int((await conn.execute(statement)).scalar_one())


def utc(moment: datetime) -> datetime:
    """A stored timestamp as an aware UTC datetime (SQLite hands back naive ones; all are UTC)."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
