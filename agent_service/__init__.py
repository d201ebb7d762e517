"""agent_service: AgentService.Chat over gRPC, and the five task tools over MCP."""
