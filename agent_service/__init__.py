"""agent_service: AgentService.Chat over gRPC, the tools over MCP, and ChatKit."""
