"""What an error reply from Redis means, and what agentcomms does about it.

hiredis hands error replies to us as :class:`ReplyError` objects; :func:`classify` turns
one into the typed error a caller sees, and :func:`is_transient` says whether the
command was refused only because Redis is not ready (loading, busy, failing over), so
that the transport holds it and sends it again instead of failing the caller.
"""

from __future__ import annotations

import re

from agentcomms.exceptions import (
    AgentCommsError,
    RedisCommandError,
    RedisOutOfMemoryError,
    RedisPermissionError,
)

__all__ = ["ProtocolError", "ReplyError", "classify", "code_of", "is_transient", "needs_reconnect"]


class ReplyError(Exception):
    """An error reply as hiredis parsed it (internal: never reaches callers)."""


class ProtocolError(Exception):
    """Bytes from Redis that are not RESP: the connection is out of step and is dropped (internal)."""


TRANSIENT_CODES = frozenset({"LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOSCRIPT", "READONLY"})
"""Refusals that say "not now": the command did not run; it is held and sent again while Redis recovers.

READONLY (we reached a replica, e.g. after a failover) also drops the connection so that the
next one can reach the new primary; NOSCRIPT (a SCRIPT FLUSH) reloads the scripts first.
"""

_RECONNECT_CODES = frozenset({"READONLY"})
_INNER_CODE = re.compile(r": -?([A-Z][A-Z]+) ")


def code_of(error: BaseException | str) -> str:
    """The error code of a Redis error reply: its first word (``ERR``, ``WRONGTYPE``, ``OOM`` ...).

    Errors raised inside a Lua script come back as ``ERR Error running script ... -OOM ...`` on
    Redis 6.2 and as the inner code on Redis 7; both give the inner code here. A command inside a
    script that the ACL user may not run is ``NOPERM``, however the Redis version words it.
    """
    text = str(error)
    code = text.split(" ", 1)[0].upper()
    if code == "ERR" and ("The user executing the script can't" in text or "ACL failure in script" in text):
        return "NOPERM"  # a command inside a script refused by the caller's ACL user (Redis 7.0; 7.2 and later)
    if (code == "ERR" and "Error running script" in text) or code.startswith("@USER_SCRIPT"):
        # ("@user_script: 74: -OOM ...": an error a script got from redis.pcall and returned, on Redis 6.2)
        # Redis 6.2: "ERR Error running script (call to f_...): @user_script:12: WRONGTYPE Operation ..."
        # (or ": -OOM command not allowed ..."): the inner code is the last upper-case word after ": "
        inner: list[str] = [c for c in _INNER_CODE.findall(text) if c != "ERR"]
        if inner:
            return inner[-1]
    return code


def is_transient(error: BaseException) -> bool:
    """Whether a reply error means "Redis is not ready; the command did not run"."""
    return isinstance(error, ReplyError) and code_of(error) in TRANSIENT_CODES


def needs_reconnect(error: BaseException) -> bool:
    """Whether the connection should be replaced (it reached a replica)."""
    return isinstance(error, ReplyError) and code_of(error) in _RECONNECT_CODES


def classify(error: ReplyError, command: str) -> AgentCommsError:
    """The typed error a caller sees for an error reply to ``command`` (its name only: arguments stay private)."""
    code = code_of(error)
    text = str(error)
    if code == "OOM":
        return RedisOutOfMemoryError(
            f"Redis is out of memory (maxmemory) and refused {command}: {text}", code=code, command=command
        )
    if code in ("NOPERM", "NOAUTH", "WRONGPASS"):
        return RedisPermissionError(f"Redis refused {command}: {text}", code=code, command=command)
    return RedisCommandError(f"Redis refused {command}: {text}", code=code, command=command)
