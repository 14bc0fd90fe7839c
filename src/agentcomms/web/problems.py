"""Errors as RFC 9457 problem details (``application/problem+json``), each with a stable ``code``.

Every error the API answers with is a :class:`Problem`: our exceptions map to a status and
a code (:data:`EXCEPTION_CODES`), request validation errors are ``invalid_request``, and
anything else is a 500 whose detail names no internals. Details never carry a traceback,
a Redis password (URLs are redacted) or the dashboard's token.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from agentcomms.exceptions import (
    AgentCommsError,
    AgentNotFoundError,
    BrokerConnectionError,
    DeadLetterNotFoundError,
    InboxFullError,
    KnowledgeNotConfiguredError,
    KnowledgeQueryError,
    MessageValidationError,
    NoAgentAvailableError,
    PermissionDeniedError,
    RedisPermissionError,
    RequestTimeoutError,
)
from agentcomms.settings import redact_url

__all__ = [
    "EXCEPTION_CODES",
    "PROBLEM_KINDS",
    "ApiProblem",
    "FieldProblem",
    "Problem",
    "ProblemKind",
    "code_for",
    "document_problems",
    "install_problem_handlers",
    "problem_for",
    "problem_responses",
    "scrub",
]

logger = logging.getLogger(__name__)

MEDIA_TYPE = "application/problem+json"


@dataclass(frozen=True, slots=True)
class ProblemKind:
    """The HTTP status and the title of one problem code."""

    status: int
    title: str


PROBLEM_KINDS: dict[str, ProblemKind] = {
    "invalid_request": ProblemKind(422, "The request is not valid"),
    "invalid_message": ProblemKind(422, "The message is not valid"),
    "invalid_query": ProblemKind(422, "The knowledge query is not valid"),
    "confirmation_required": ProblemKind(400, "Confirmation required"),
    "unauthorized": ProblemKind(401, "A valid bearer token is required"),
    "forbidden": ProblemKind(403, "Not allowed"),
    "agent_not_found": ProblemKind(404, "No such agent"),
    "no_agent_available": ProblemKind(404, "No agent of that role is online"),
    "dead_letter_not_found": ProblemKind(404, "No such dead letter"),
    "conversation_not_found": ProblemKind(404, "No such conversation in the record"),
    "message_not_found": ProblemKind(404, "No such message in the record or its recipient's inbox"),
    "not_found": ProblemKind(404, "Not found"),
    "method_not_allowed": ProblemKind(405, "Method not allowed"),
    "inbox_full": ProblemKind(503, "The recipient's inbox is full"),
    "redis_unavailable": ProblemKind(503, "Redis is unavailable"),
    "knowledge_unavailable": ProblemKind(503, "The knowledge service is unavailable"),
    "timeout": ProblemKind(504, "No reply in time"),
    "internal_error": ProblemKind(500, "Internal error"),
}
"""Every code the API answers with, except the 500s named after an exception class."""

_DOCUMENTED = {
    "internal_error": "`internal_error`, or the class name of another agentcomms error (`BrokerClosedError` ...)"
}
"""How the OpenAPI document names a code, where the code alone does not say it all."""

EXCEPTION_CODES: dict[type[Exception], str] = {
    AgentNotFoundError: "agent_not_found",
    NoAgentAvailableError: "no_agent_available",
    DeadLetterNotFoundError: "dead_letter_not_found",
    RequestTimeoutError: "timeout",
    MessageValidationError: "invalid_message",  # MessageTooLargeError too
    InboxFullError: "inbox_full",
    BrokerConnectionError: "redis_unavailable",  # CommandOutcomeUnknownError too
    PermissionDeniedError: "forbidden",
    RedisPermissionError: "forbidden",
    KnowledgeQueryError: "invalid_query",
    KnowledgeNotConfiguredError: "knowledge_unavailable",
}
"""Our exceptions' codes; a subclass takes its nearest listed class's. Any other AgentCommsError: 500, its name."""

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


class FieldProblem(BaseModel):
    """One invalid part of a request: where it is (``["body", "timeout"]``) and what is wrong with it."""

    loc: list[str | int]
    message: str
    type: str


class Problem(BaseModel):
    """An RFC 9457 problem detail, with a stable machine-readable ``code``."""

    type: str
    """``urn:agentcomms:problem:<code>``."""
    title: str
    status: int
    detail: str
    code: str
    errors: list[FieldProblem] | None = None
    """For ``invalid_request``: each invalid field."""


class ApiProblem(Exception):
    """Raised by the API itself for a problem that is not one of the library's errors (401, 400 ...)."""

    def __init__(self, code: str, detail: str, *, headers: Mapping[str, str] | None = None) -> None:
        self.code = code
        self.detail = detail
        self.headers = dict(headers or {})
        super().__init__(f"{code}: {detail}")


def code_for(exc: AgentCommsError) -> str:
    """The problem code of one of our exceptions (its class name if it has none)."""
    for cls in type(exc).__mro__:
        code = EXCEPTION_CODES.get(cls)
        if code is not None:
            return code
    return type(exc).__name__


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with URL passwords redacted and each of ``secrets`` replaced by ``***``."""
    text = _URL.sub(lambda match: redact_url(match.group(0)), text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def problem_for(exc: AgentCommsError, secrets: Iterable[str] = ()) -> Problem:
    """The problem detail of one of our exceptions."""
    code = code_for(exc)
    kind = PROBLEM_KINDS.get(code, ProblemKind(500, "agentcomms error"))
    return _problem(code, kind, scrub(str(exc), secrets) or kind.title)


def _problem(code: str, kind: ProblemKind, detail: str, errors: list[FieldProblem] | None = None) -> Problem:
    return Problem(
        type=f"urn:agentcomms:problem:{code}", title=kind.title, status=kind.status, detail=detail, code=code,
        errors=errors,
    )  # fmt: skip


def _response(problem: Problem, headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = problem.model_dump(mode="json", exclude_none=True)
    return JSONResponse(body, status_code=problem.status, headers=dict(headers or {}), media_type=MEDIA_TYPE)


def _line(code: str) -> str:
    return f"{_DOCUMENTED.get(code, f'`{code}`')}: {PROBLEM_KINDS[code].title}"


def problem_responses(*codes: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` documenting these codes, grouped by status."""
    by_status: dict[int, list[str]] = {}
    for code in codes:
        by_status.setdefault(PROBLEM_KINDS[code].status, []).append(code)
    return {
        status: {"model": Problem, "description": "; ".join(_line(c) for c in found)}
        for status, found in sorted(by_status.items())
    }


def document_problems(schema: dict[str, Any], *, everywhere: Iterable[str] = ()) -> dict[str, Any]:
    """An OpenAPI document whose error responses are ``application/problem+json``, with ``everywhere``'s codes added.

    FastAPI documents every extra response with the route's media type (JSON), and a
    router's ``responses`` do not merge with a route's of the same status: both are done here.
    """
    reference = "#/components/schemas/Problem"
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for code in everywhere:
                kind, line = PROBLEM_KINDS[code], _line(code)
                entry = responses.setdefault(str(kind.status), {"description": "", "content": {}})
                content = entry.setdefault("content", {})
                if not content:
                    content["application/json"] = {"schema": {"$ref": reference}}
                if content.get("application/json", {}).get("schema", {}).get("$ref") == reference:
                    entry["description"] = f"{entry['description']}; {line}" if entry["description"] else line
            for status, entry in responses.items():
                content = entry.get("content", {})
                body = content.get("application/json")
                if status[:1] in "45" and body is not None and body.get("schema", {}).get("$ref") == reference:
                    content[MEDIA_TYPE] = content.pop("application/json")
    return schema


def _message(error: Mapping[str, Any], secrets: Iterable[str]) -> str:
    return scrub(str(error.get("msg", "")).removeprefix("Value error, "), secrets)


def install_problem_handlers(app: FastAPI, *, secrets: Iterable[str] = ()) -> None:
    """Answer every error of ``app`` as a problem detail; ``secrets`` never appear in one."""
    hidden = tuple(s for s in secrets if s)

    async def agentcomms_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, AgentCommsError)
        problem = problem_for(exc, hidden)
        if problem.status == 500:  # an error the API has no answer for: worth a look
            logger.error("%s %s failed: %s: %s", request.method, request.url.path, problem.code, problem.detail)
        return _response(problem)

    async def api_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiProblem)
        return _response(_problem(exc.code, PROBLEM_KINDS[exc.code], scrub(exc.detail, hidden)), exc.headers)

    async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [
            FieldProblem(
                loc=list(e.get("loc", ())), message=scrub(str(e.get("msg", "")), hidden), type=e.get("type", "")
            )
            for e in exc.errors()
        ]  # the rejected input itself is not echoed
        detail = "; ".join(f"{'.'.join(map(str, f.loc))}: {f.message}" for f in errors) or "invalid request"
        return _response(_problem("invalid_request", PROBLEM_KINDS["invalid_request"], detail, errors))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        kind = PROBLEM_KINDS.get(code, ProblemKind(exc.status_code, str(exc.detail)))
        return _response(_problem(code, kind, scrub(str(exc.detail), hidden)), exc.headers)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # the server logs the exception with its traceback (Starlette raises it again after this answer)
        kind = PROBLEM_KINDS["internal_error"]
        return _response(_problem("internal_error", kind, "an unexpected error occurred; see the server's log"))

    app.add_exception_handler(AgentCommsError, agentcomms_error)
    app.add_exception_handler(ApiProblem, api_problem)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
