"""``create_app``: the dashboard's FastAPI app, whose lifespan owns its Redis connections.

Serve it with any ASGI server, e.g. ``uvicorn --factory agentcomms.web:create_app``.
With ``AGENTCOMMS_DASHBOARD_TOKEN`` set, every ``/api`` route wants
``Authorization: Bearer <token>``; the OpenAPI document (``/api/openapi.json``) and its
viewer (``/api/docs``) stay readable without it: they describe the API, not the data.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import agentcomms
from agentcomms.exceptions import AgentCommsError
from agentcomms.settings import Settings
from agentcomms.web.api import Dashboard, router
from agentcomms.web.graphql import graphql_router
from agentcomms.web.metrics import NetworkMetrics
from agentcomms.web.problems import ApiProblem, document_problems, install_problem_handlers

__all__ = ["TOKEN_VARIABLE", "create_app"]

logger = logging.getLogger(__name__)

TOKEN_VARIABLE = "AGENTCOMMS_DASHBOARD_TOKEN"
"""The environment variable holding the bearer token the API wants (unset or empty: no token)."""


class _App(FastAPI):
    """FastAPI, with its error responses documented as ``application/problem+json``."""

    problems_everywhere: tuple[str, ...] = ()
    """Problem codes any route may answer with (documented on each)."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = document_problems(super().openapi(), everywhere=self.problems_everywhere)
        return self.openapi_schema


_BEARER = HTTPBearer(auto_error=False, scheme_name="dashboard token", description=f"The value of {TOKEN_VARIABLE}.")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]
"""The bearer token of a request, if it has one (annotations name module-level objects: FastAPI resolves them)."""


def _require(token: str) -> Callable[..., Awaitable[None]]:
    """A dependency refusing requests without ``Authorization: Bearer <token>`` (401, ``WWW-Authenticate``)."""
    expected = token.encode()

    async def require_token(credentials: Credentials) -> None:
        given = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(given, expected):  # in constant time: the token is not guessed byte by byte
            detail = "a bearer token is required" if credentials is None else "the bearer token is not valid"
            raise ApiProblem("unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})

    return require_token


def create_app(settings: Settings | None = None) -> FastAPI:
    """The dashboard app: the REST API under ``/api``, its OpenAPI document at ``/api/openapi.json``.

    Nothing connects here: the app's lifespan connects to Redis (a broker, and a registry
    and a sender on it, as ``dashboard``, or with security on as the identity the process
    holds) and closes everything when it ends.

    Args:
        settings: where Redis is and how to talk to it; default read from the environment.

    Raises:
        ConfigError: the settings in the environment are invalid.
    """
    settings = settings or Settings()
    secret = settings.dashboard_token
    token = secret.get_secret_value().strip() if secret is not None else ""  # a header cannot carry spaces around
    metrics = NetworkMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        dashboard = await Dashboard.open(settings)
        app.state.dashboard = dashboard
        counting = asyncio.create_task(_count(metrics, dashboard))
        logger.info("dashboard API ready; bearer token %s", "required" if token else f"not required ({TOKEN_VARIABLE})")
        try:
            yield
        finally:
            counting.cancel()
            await asyncio.gather(counting, return_exceptions=True)
            app.state.dashboard = None
            await dashboard.close()

    app = _App(
        title="agentcomms",
        version=agentcomms.__version__,
        summary="The agentcomms dashboard's API: agents, messages, dead letters, knowledge and the live feed.",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        swagger_ui_oauth2_redirect_url="/api/docs/oauth2-redirect",
        redoc_url=None,
        lifespan=lifespan,
    )
    install_problem_handlers(app, secrets=[token])
    guard = [Depends(_require(token))] if token else []
    app.include_router(router, dependencies=guard)
    app.include_router(_metrics_router(metrics), dependencies=guard)
    app.include_router(graphql_router(guard, secrets=[token]))  # /graphql: the same token; none of it shown in errors
    app.include_router(_probes_router())  # no token: probes carry none, and they say nothing but up or down
    app.problems_everywhere = ("unauthorized",) * bool(token) + ("redis_unavailable", "internal_error")
    if STATIC.is_dir():  # the page, at / (after the API: its routes win)
        app.mount("/", StaticFiles(directory=STATIC, html=True), name="page")
    return app


STATIC = Path(__file__).parent / "static"
"""The dashboard's page: plain HTML, CSS and JavaScript, no build step."""


async def _count(metrics: NetworkMetrics, dashboard: Dashboard) -> None:
    """Feed the metrics from the live feed for as long as the app runs (a lost feed is resubscribed)."""
    try:
        await metrics.follow(dashboard.broker)
    except AgentCommsError as exc:  # e.g. this Redis user may not read the feed: the gauges still work
        logger.warning("metrics: the live feed is not available (%s); counters stay at zero", exc)


def _probes_router() -> APIRouter:
    """``/healthz`` (the process answers) and ``/readyz`` (Redis answers) for liveness and readiness probes."""
    router = APIRouter()

    @router.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @router.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> Response:
        dashboard: Dashboard | None = getattr(request.app.state, "dashboard", None)
        healthy = dashboard is not None and (await dashboard.broker.health_check())["status"] == "healthy"
        body = b'{"ready":true}' if healthy else b'{"ready":false}'
        return Response(body, status_code=200 if healthy else 503, media_type="application/json")

    return router


def _metrics_router(metrics: NetworkMetrics) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics", include_in_schema=False)
    async def prometheus(request: Request) -> Response:
        """Prometheus exposition: feed counters since the dashboard started, gauges read now."""
        dashboard: Dashboard = request.app.state.dashboard
        await metrics.refresh(dashboard.broker, dashboard.registry)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router
