# One image for the three services (and the one-shot job that renders Envoy's config).
# The command picks the service: python -m task_service | conversation_service | agent_service.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so code changes reuse this layer. The project installs no package of
# its own (the code runs from /app), only its dependencies.
COPY pyproject.toml ./
RUN pip install .

COPY protos ./protos
COPY common ./common
COPY gateway ./gateway
COPY scripts ./scripts
COPY task_service ./task_service
COPY conversation_service ./conversation_service
COPY agent_service ./agent_service

# Stubs (todo/v1), the descriptor set and the OpenAPI document, all from protos/.
RUN python scripts/gen_protos.py

# Unprivileged; STATE_DIR holds nothing important in containers (databases are PostgreSQL).
# /etc/envoy/todo is where the gateway-config job writes Envoy's files (a named volume
# takes this directory's ownership when first created).
RUN useradd --system --uid 10001 --home-dir /app app \
    && mkdir -p /app/.state /etc/envoy/todo \
    && chown app /app/.state /etc/envoy/todo
USER app

ENV STATE_DIR=/app/.state \
    GRPC_BIND_HOST=0.0.0.0 \
    LOG_FORMAT=json

EXPOSE 50051 50052 50053 8001
CMD ["python", "-m", "task_service"]
