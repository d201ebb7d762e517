from common.migrations_env import run
from task_service.models import metadata

run(metadata, version_table="task_service_alembic_version")
