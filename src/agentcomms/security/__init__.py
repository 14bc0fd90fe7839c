"""Identities, authentication, authorization and sealing (docs/security.md).

* :class:`Identity` / :class:`PublicIdentity`: who a process speaks as (Ed25519 + X25519 keys).
* :class:`TrustStore` / :class:`TrustRecord`: identities an admin enrolled, with their roles.
* :class:`Security`: what a broker uses on the hot path (pair keys, tokens, replay memory, policy).
* :class:`Policy`: which roles may send which intents to which roles.
* :func:`enrol_team`: create and enrol identities in one go (the demo, tests, a first setup).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from agentcomms.exceptions import IdentityError
from agentcomms.security.guard import Refusal, Security, load_anchors
from agentcomms.security.identity import Identity, PublicIdentity, b64decode, b64encode, load_identities
from agentcomms.security.policy import Policy, Rule
from agentcomms.security.trust import TrustRecord, TrustStore, canonical_json
from agentcomms.settings import Settings
from agentcomms.transport import Commands

__all__ = [
    "Identity",
    "Policy",
    "PublicIdentity",
    "Refusal",
    "Rule",
    "Security",
    "TrustRecord",
    "TrustStore",
    "b64decode",
    "b64encode",
    "canonical_json",
    "create_admin",
    "enrol_team",
    "load_anchors",
    "load_identities",
    "speaking_as",
]


def speaking_as(settings: Settings, default: str) -> str:
    """The sender id a tool (the CLI, the dashboard) speaks as: ``default``, or with security on its identity.

    Raises:
        IdentityError: security is on and no single identity is configured.
    """
    if settings.security != "on":
        return default
    if settings.identity_file is not None:
        return Identity.load(settings.identity_file).id
    held = load_identities(settings.identities_folder)
    if len(held) == 1:
        return next(iter(held))
    raise IdentityError(
        f"AGENTCOMMS_SECURITY is on: set AGENTCOMMS_IDENTITY to the identity file to speak as "
        f"({len(held)} identities in {settings.identities_folder}; `agentcomms identity create ID` makes one)"
    )


def create_admin(folder: str | Path, admin_id: str = "admin") -> Identity:
    """A new admin identity in ``folder`` (``<id>.json``), its public key added to ``folder/trust_anchors``."""
    folder = Path(folder)
    admin = Identity.generate(admin_id)
    admin.save(folder / f"{admin_id}.json")
    with (folder / "trust_anchors").open("a", encoding="utf-8") as anchors:
        anchors.write(b64encode(admin.public.ed25519) + "\n")
    return admin


async def enrol_team(
    pipeliner: Commands, folder: str | Path, admin: Identity, members: Iterable[tuple[str, list[str]]]
) -> list[TrustRecord]:
    """Create an identity file in ``folder`` for each ``(id, roles)`` that has none, and enrol each with its roles.

    The admin is enrolled too (as an admin, no role), so it can send as itself.
    """
    folder = Path(folder)
    store = TrustStore(pipeliner, [admin.public.ed25519])
    records = [await store.enroll(admin, admin.public, is_admin=True)]
    for identity_id, roles in members:
        path = folder / f"{identity_id}.json"
        identity = Identity.load(path) if path.exists() else Identity.generate(identity_id)
        if not path.exists():
            identity.save(path)
        records.append(await store.enroll(admin, identity.public, roles=roles))
    return records
