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
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Table, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from common import metrics
from common.settings import Settings


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
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,  # a restarted PostgreSQL costs one failed check, not a failed request
        pool_recycle=1800,
        connect_args=POSTGRES_CONNECT_ARGS,
    )


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
    config = Config()
    config.set_main_option("script_location", str(migrations_dir))
    config.attributes["database_url"] = sync_url(url)
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(config, "head")


async def migrate(migrations_dir: Path, url: str) -> None:
    """Apply the service's migrations up to head (off the event loop: alembic is synchronous)."""
    await asyncio.to_thread(migrate_sync, migrations_dir, url)


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
