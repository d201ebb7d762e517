"""The body of every service's alembic env.py: run migrations on the configured URL.

On PostgreSQL an advisory lock serializes replicas that start at the same moment, so two
of them never apply the same migration twice.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import MetaData, create_engine, pool, text

MIGRATION_LOCK_ID = 0x7D0_0001  # any constant shared by all our services


def run(target_metadata: MetaData | None = None, version_table: str = "alembic_version") -> None:
    url = str(context.config.attributes.get("database_url") or context.config.get_main_option("sqlalchemy.url"))
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        is_postgres = connection.dialect.name == "postgresql"
        if is_postgres:
            connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID})
            connection.commit()
        try:
            context.configure(connection=connection, target_metadata=target_metadata, version_table=version_table)
            with context.begin_transaction():
                context.run_migrations()
            connection.commit()
        finally:
            if is_postgres:
                connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})
                connection.commit()
    engine.dispose()
