"""Which knowledge domains each role may read.

The default is the seed's table. A JSON file (``AGENTCOMMS_KNOWLEDGE_PERMISSIONS``) adds
roles or replaces their grants::

    {"replace": false, "roles": {"cso": ["executive", "sales"], "intern": []}}

``replace: true`` drops the defaults first. Roles are compared case-folded. A role that
is not listed, or is granted nothing, reads nothing: an empty grant is never "no filter".
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentcomms.exceptions import ConfigError
from agentcomms.knowledge.sources import normalise_domain
from agentcomms.schemas import Name, describe_errors

__all__ = ["DEFAULT_PERMISSIONS", "KnowledgePermissions"]

DEFAULT_PERMISSIONS: Mapping[str, frozenset[str]] = {
    "cmo": frozenset({"executive", "marketing", "sales", "product"}),
    "marketing_manager": frozenset({"marketing", "product"}),
    "content_agent": frozenset({"marketing", "content"}),
    "seo_agent": frozenset({"marketing", "seo"}),
}
"""The seed's table: role -> the domains it may read."""


class _PermissionsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replace: bool = False
    roles: dict[Name, list[Name]] = Field(default_factory=dict)


def _key(name: str) -> str:
    return name.strip().casefold()


class KnowledgePermissions:
    """Role -> the knowledge domains it may read (case-folded); unknown roles read nothing."""

    def __init__(self, grants: Mapping[str, Iterable[str]] | None = None) -> None:
        """Raises ConfigError for a domain that cannot be one (it would never match an ingested domain)."""
        source = DEFAULT_PERMISSIONS if grants is None else grants
        self._grants: dict[str, frozenset[str]] = {}
        for role, domains in source.items():
            if isinstance(domains, str):
                raise ConfigError(f"role {role!r}: its domains must be a list, not the string {domains!r}")
            names = set()
            for domain in domains:
                name = normalise_domain(domain)
                if name is None:
                    raise ConfigError(f"role {role!r}: {domain!r} is not a domain name (letters, digits, _ and -)")
                names.add(name)
            self._grants[_key(role)] = frozenset(names)

    @classmethod
    def from_file(cls, path: Path | None) -> KnowledgePermissions:
        """The defaults, extended or replaced by the JSON file at ``path`` (``None``: the defaults).

        Raises:
            ConfigError: the file cannot be read or is not a permissions file.
        """
        if path is None:
            return cls()
        try:
            loaded = _PermissionsFile.model_validate(json.loads(Path(path).read_text(encoding="utf-8")))
        except OSError as exc:
            raise ConfigError(f"cannot read the knowledge permissions file {path}: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"knowledge permissions file {path} is not JSON: {exc}") from None
        except ValidationError as exc:
            raise ConfigError(f"knowledge permissions file {path}: {describe_errors(exc)}") from None
        grants: dict[str, Iterable[str]] = {} if loaded.replace else dict(DEFAULT_PERMISSIONS)
        grants.update(loaded.roles)
        try:
            return cls(grants)
        except ConfigError as exc:
            raise ConfigError(f"knowledge permissions file {path}: {exc}") from None

    def domains(self, role: str | None) -> frozenset[str]:
        """The domains ``role`` may read (empty for an unknown role or ``None``)."""
        return self._grants.get(_key(role), frozenset()) if role else frozenset()

    def common(self, roles: Iterable[str]) -> frozenset[str]:
        """The domains every one of ``roles`` may read (an agent answering for an asker reads only these)."""
        result: frozenset[str] | None = None
        for role in roles:
            granted = self.domains(role)
            result = granted if result is None else result & granted
        return result or frozenset()

    def as_dict(self) -> dict[str, list[str]]:
        """Role -> sorted domains, for display."""
        return {role: sorted(domains) for role, domains in sorted(self._grants.items())}
