"""The dashboard's API fuzzed from its own OpenAPI document with schemathesis: no server error, responses as documented.

A bounded run (a few examples per operation) against a real Redis, with a knowledge service running
so that knowledge searches are answered. Excluded: the live feed (it never ends) and the check that
every schema-valid body is accepted (a request names exactly one of ``recipient_id`` and ``role``,
which the OpenAPI document cannot say).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import schemathesis
import uvicorn
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings

from agentcomms import KnowledgeService, Settings
from agentcomms.web.app import create_app

EXAMPLES = 12


def fuzz(base: str) -> int:
    schema = schemathesis.openapi.from_url(f"{base}/api/openapi.json").exclude(path="/api/events")
    operations = 0
    for result in schema.get_all_operations():
        unwrap = getattr(result, "ok", None)  # an Err: the document describes this operation badly
        assert unwrap is not None, result
        operation = unwrap()

        @hypothesis_settings(
            max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:  # a schemathesis Case
            case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance])

        check()
        operations += 1
    return operations


async def test_no_request_the_schema_allows_gets_a_server_error(settings: Settings, tmp_path: Path) -> None:
    kb = settings.model_copy(update={"knowledge_dir": tmp_path / "kb"})
    server = uvicorn.Server(uvicorn.Config(create_app(kb), host="127.0.0.1", port=0, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    async with KnowledgeService(kb):
        async with asyncio.timeout(30):
            while not server.started:
                await asyncio.sleep(0.05)  # uvicorn has no "started" event to wait on
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            operations = await asyncio.to_thread(fuzz, f"http://127.0.0.1:{port}")  # the loop keeps serving
        finally:
            server.should_exit = True
            await serving
    assert operations == 17  # every route but the live feed
