"""`python -m agent_service`: serve AgentService on AGENT_SERVICE_ADDR's port (and MCP over HTTP)."""

from agent_service.server import SERVICE_NAMES, lifespan
from common.server import main

if __name__ == "__main__":
    main("agent_service", SERVICE_NAMES, lambda settings: settings.agent_service_addr, lifespan)
