# agentcomms: one image for agents (run-agent), the knowledge service and the dashboard.
#   docker build -t agentcomms .                       (EXTRAS=web for a smaller image without the knowledge memory)
#   docker run --rm agentcomms --help
FROM python:3.11-slim AS build
ARG EXTRAS=web,knowledge
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[${EXTRAS}]"

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin agentcomms
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl && rm -rf /wheels
USER 10001
WORKDIR /home/agentcomms
ENV PYTHONUNBUFFERED=1 \
    AGENTCOMMS_DATA_DIR=/home/agentcomms/data \
    AGENTCOMMS_HANDLE_SIGNALS=true
# 8080: an agent's /healthz and /readyz (--health-port), 8765: the dashboard, 9100: agent metrics (--metrics-port)
EXPOSE 8080 8765 9100
ENTRYPOINT ["agentcomms"]
CMD ["--help"]
