"""The REST gateway: Envoy's configuration (one renderer for native and containers) and OpenAPI."""
