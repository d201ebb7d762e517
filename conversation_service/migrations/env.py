from common.migrations_env import run
from conversation_service.models import metadata

run(metadata, version_table="conversation_service_alembic_version")
