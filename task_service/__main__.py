"""`python -m task_service`: serve TaskService on TASK_SERVICE_ADDR's port."""

from common.server import main
from task_service.server import SERVICE_NAMES, lifespan

if __name__ == "__main__":
    main("task_service", SERVICE_NAMES, lambda settings: settings.task_service_addr, lifespan)
