"""Health endpoints of an agent process, for liveness and readiness probes (Kubernetes, Compose, load balancers).

``agentcomms run-agent --health-port N`` (or :func:`serve_health`) serves, on its own small
HTTP server (the standard library's WSGI server, in a thread):

* ``GET /healthz``: 200 while the process's event loop answers within 2 s (a loop blocked
  by a handler that never yields, or a dead loop, is 503: restart the process);
* ``GET /readyz``: 200 when every agent is ready (registered, its heartbeat going through,
  and reading its inbox), else 503 with which are not and why. A probe that fails while
  Redis is away takes the process out of a Service's endpoints without restarting it.

Both answer a small JSON object. Nothing else is served (404), and nothing secret is in it.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import TimeoutError as FutureTimeout
from socketserver import ThreadingMixIn
from types import TracebackType
from typing import Any, Self
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from agentcomms.agent import BaseAgent

__all__ = ["HealthServer", "serve_health"]

LOOP_TIMEOUT = 2.0
"""Seconds the event loop has to answer a liveness probe."""

_StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes come every few seconds: no line per probe


class HealthServer:
    """The running health endpoints (see :func:`serve_health`); :meth:`close` stops them."""

    def __init__(self, agents: list[BaseAgent], loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        self.agents = agents
        self._loop = loop
        self._httpd = make_server(host, port, self._app, server_class=_Server, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="agentcomms-health", daemon=True)
        self._thread.start()
        self.host = host
        self.port = int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:8080``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        """Stop serving (safe to call twice)."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    # -- in the server's thread ------------------------------------------------------------------

    def _app(self, environ: dict[str, Any], start_response: _StartResponse) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _answer(start_response, "405 Method Not Allowed", {"error": "only GET"})
        if path == "/healthz":
            alive = self._loop_answers()
            return _answer(start_response, "200 OK" if alive else "503 Service Unavailable",
                           {"status": "alive" if alive else "event loop not answering"})  # fmt: skip
        if path == "/readyz":
            report = self._readiness()
            ready = all(agent["ready"] for agent in report)
            status = "200 OK" if ready and report else "503 Service Unavailable"
            return _answer(start_response, status, {"ready": ready and bool(report), "agents": report})
        return _answer(start_response, "404 Not Found", {"error": "not found: /healthz or /readyz"})

    def _loop_answers(self) -> bool:
        if self._loop.is_closed():
            return False
        try:
            future = asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self._loop)
            future.result(LOOP_TIMEOUT)
        except (FutureTimeout, RuntimeError):
            return False
        return True

    def _readiness(self) -> list[dict[str, Any]]:
        report = []
        for agent in self.agents:
            registered, reading = agent.registered, agent.reading
            report.append(
                {
                    "agent_id": agent.agent_id,
                    "ready": registered and reading,
                    "registered": registered,
                    "reading": reading,
                }
            )
        return report


def _answer(start_response: _StartResponse, status: str, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def serve_health(agents: Iterable[BaseAgent], *, port: int = 0, host: str = "127.0.0.1") -> HealthServer:
    """Serve ``/healthz`` and ``/readyz`` for ``agents`` until the result is closed; call from their event loop.

    Raises:
        OSError: the address cannot be listened on (the port is taken ...).
    """
    return HealthServer(list(dict.fromkeys(agents)), asyncio.get_running_loop(), host, port)
