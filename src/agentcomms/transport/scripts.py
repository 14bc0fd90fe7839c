"""The Lua scripts: one file each under ``lua/``, a stable interface that docs/protocol.md describes.

Each file is a complete script (no includes), so a client in another language can load
the same text. They are called by SHA; every (re)connection loads them all before any
command goes out, so a restarted Redis never answers NOSCRIPT to a queued call.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib import resources

__all__ = [
    "ACK",
    "ALL_SCRIPTS",
    "DEAD_LETTER",
    "PURGE",
    "REDRIVE",
    "REGISTRY_BEAT",
    "REGISTRY_DEREGISTER",
    "REGISTRY_FIND",
    "REGISTRY_LEAVE",
    "REGISTRY_REGISTER",
    "REGISTRY_SET_STATUS",
    "REGISTRY_STATS",
    "SEND",
    "Script",
    "script_name",
]


@dataclass(frozen=True)
class Script:
    """A Lua script from ``lua/<name>.lua``, called by its SHA1."""

    name: str
    body: str = field(repr=False)
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.body.encode()).hexdigest())

    @classmethod
    def load(cls, name: str) -> Script:
        """The script in ``lua/<name>.lua`` (shipped inside the package)."""
        script = cls(name, (resources.files(__package__) / "lua" / f"{name}.lua").read_text(encoding="utf-8"))
        _BY_SHA[script.sha] = script
        return script


_BY_SHA: dict[str, Script] = {}

SEND = Script.load("send")
ACK = Script.load("ack")
DEAD_LETTER = Script.load("dead_letter")
REDRIVE = Script.load("redrive")
PURGE = Script.load("purge")
REGISTRY_REGISTER = Script.load("registry_register")
REGISTRY_BEAT = Script.load("registry_beat")
REGISTRY_LEAVE = Script.load("registry_leave")
REGISTRY_DEREGISTER = Script.load("registry_deregister")
REGISTRY_FIND = Script.load("registry_find")
REGISTRY_SET_STATUS = Script.load("registry_set_status")
REGISTRY_STATS = Script.load("registry_stats")

ALL_SCRIPTS: tuple[Script, ...] = tuple(_BY_SHA.values())
"""Every script, loaded on every connection before anything else is sent."""


def script_name(sha: bytes | str) -> str:
    """The name of the script with this SHA (for messages), or the SHA itself."""
    key = sha.decode() if isinstance(sha, bytes) else sha
    found = _BY_SHA.get(key)
    return found.name if found else key
