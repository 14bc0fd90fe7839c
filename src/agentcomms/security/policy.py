"""Authorization: which roles may send which intents to which roles, from a JSON policy file.

.. code-block:: json

    {"default": "allow",
     "rules": [{"intents": ["assign_task"], "to_roles": ["cto"], "from_roles": ["ceo", "cmo", "cso"]},
               {"intents": ["*"], "to_roles": ["cfo"], "from_roles": ["ceo"]}]}

A rule applies to a message when its intent is in ``intents`` and the recipient's role in
``to_roles`` (``"*"`` matches anything). The first rule that applies decides: the message
is allowed if one of the sender's roles is in ``from_roles``. When no rule applies,
``default`` decides (``allow`` or ``deny``). Roles compare case-folded. The sender's roles
are those the trust store gives its verified identity, never a field of the message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentcomms.exceptions import ConfigError

__all__ = ["Policy", "Rule"]


def _names(raw: Any, field: str, path: str) -> frozenset[str]:
    if not isinstance(raw, list) or not raw or not all(isinstance(n, str) and n.strip() for n in raw):
        raise ConfigError(f"{field} must be a non-empty list of names", path=path)
    return frozenset(n.strip().casefold() for n in raw)


@dataclass(frozen=True)
class Rule:
    """One rule: for ``intents`` sent to ``to_roles``, only ``from_roles`` may send."""

    intents: frozenset[str]
    to_roles: frozenset[str]
    from_roles: frozenset[str]

    def applies(self, intent: str, recipient_role: str) -> bool:
        """Whether this rule decides for ``intent`` sent to an agent of ``recipient_role``."""
        return ("*" in self.intents or intent in self.intents) and (
            "*" in self.to_roles or recipient_role in self.to_roles
        )

    def admits(self, sender_roles: Iterable[str]) -> bool:
        """Whether one of ``sender_roles`` may send."""
        return "*" in self.from_roles or any(role in self.from_roles for role in sender_roles)


@dataclass(frozen=True)
class Policy:
    """Rules checked in order, then a default."""

    rules: tuple[Rule, ...] = ()
    default_allow: bool = True

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a policy file.

        Raises:
            ConfigError: missing, not JSON, or not in the shape above.
        """
        where = str(path)
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read the policy file: {exc.strerror}", path=where) from None
        except ValueError as exc:
            raise ConfigError(f"the policy file is not JSON: {exc}", path=where) from None
        if not isinstance(raw, dict) or set(raw) - {"default", "rules"}:
            raise ConfigError('a policy is {"default": "allow"|"deny", "rules": [...]}', path=where)
        default = raw.get("default", "allow")
        if default not in ("allow", "deny"):
            raise ConfigError('"default" is "allow" or "deny"', path=where)
        rules = []
        for number, item in enumerate(raw.get("rules", []), 1):
            if not isinstance(item, dict) or set(item) != {"intents", "to_roles", "from_roles"}:
                raise ConfigError(f"rule {number} needs exactly intents, to_roles and from_roles", path=where)
            rules.append(
                Rule(
                    _names(item["intents"], f"rule {number}: intents", where),
                    _names(item["to_roles"], f"rule {number}: to_roles", where),
                    _names(item["from_roles"], f"rule {number}: from_roles", where),
                )
            )
        return cls(tuple(rules), default == "allow")

    def allows(self, sender_roles: Iterable[str], intent: str, recipient_role: str) -> bool:
        """Whether a sender with ``sender_roles`` may send ``intent`` to an agent of ``recipient_role``."""
        roles = [r.strip().casefold() for r in sender_roles]
        intent, recipient_role = intent.casefold(), recipient_role.strip().casefold()
        for rule in self.rules:
            if rule.applies(intent, recipient_role):
                return rule.admits(roles)
        return self.default_allow
