"""Registry records with security on: who may write an agent's record, and which records readers believe.

Redis cannot check signatures, and every identity that may register itself may write the
registry's keys. So the registry is made trustworthy on the reading side: a record is
signed (Ed25519) by the agent's own identity, or by an admin, over its canonical bytes,
and a reader uses a record only if its signature is valid and its role is one the trust
store gives that identity. An impostor's record, or a role changed by hand, is skipped.
The library also refuses to *write* for an identity it does not hold (or without admin
rights for a role change), so the API says no before Redis is touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

from cryptography.exceptions import InvalidSignature

from agentcomms.exceptions import PermissionDeniedError, TrustError
from agentcomms.schemas import AgentInfo
from agentcomms.security.guard import Security
from agentcomms.security.identity import b64decode, b64encode
from agentcomms.security.trust import canonical_json, key_fingerprint

__all__ = ["RecordGuard"]

logger = logging.getLogger(__name__)

_CONTEXT = b"agentcomms v1 registry\n"


def _signed_bytes(fields: dict[str, Any]) -> bytes:
    return _CONTEXT + canonical_json({k: v for k, v in fields.items() if k != "signature"})


class RecordGuard:
    """Signs the records this process registers and checks the ones it reads (verdicts cached by content)."""

    def __init__(self, security: Security) -> None:
        self._security = security
        self._verdicts: dict[str, tuple[bool, float]] = {}  # digest of the record -> verdict, until when
        self.unverified = 0
        """Records skipped so far because they were not signed by their agent (or an admin) for their role."""

    def authorize(self, info: AgentInfo, *, replace: bool) -> None:
        """Refuse to write a record this process may not write.

        Raises:
            PermissionDeniedError: it holds neither the agent's identity nor an admin's; or a role change
                (``replace``) without an admin identity.
        """
        security = self._security
        admin = security.admin_identity()
        if info.agent_id not in security.identities and admin is None:
            raise PermissionDeniedError(
                f"this process holds no identity for {info.agent_id!r}: only it, or an admin, may register it"
            )
        if replace and admin is None:
            raise PermissionDeniedError("only an admin may replace a registered agent's role (replace=True)")

    async def sign(self, info: AgentInfo, stored: dict[str, Any]) -> str:
        """The signature of a record about to be stored (``stored``: its JSON fields).

        Raises:
            TrustError: the agent is not enrolled.
            PermissionDeniedError: its role is not one the trust store gives it (and no admin signs instead).
        """
        security = self._security
        record = await security.trust.get(info.agent_id)
        identity = security.identities.get(info.agent_id)
        admin = security.admin_identity()
        data = _signed_bytes(stored)
        if identity is not None and record.has_role(info.role) and record.identity == identity.public:
            return f"self:{b64encode(identity.sign(data))}"
        if admin is not None:
            return f"admin:{key_fingerprint(admin.public.ed25519)}:{b64encode(admin.sign(data))}"
        raise PermissionDeniedError(
            f"{info.agent_id!r} is enrolled with roles {', '.join(record.roles) or 'none'}, not {info.role!r}: "
            "an admin enrols roles (`agentcomms identity trust --role`)"
        )

    async def believe(self, agent_id: str, raw: bytes) -> bool:
        """Whether the stored record ``raw`` of ``agent_id`` is signed for its role (logged once when not)."""
        digest = hashlib.sha256(agent_id.encode() + b"\0" + raw).hexdigest()
        found = self._verdicts.get(digest)
        if found is not None and found[1] > time.monotonic():
            verdict = found[0]
        else:  # checked again as often as the trust store is read: a revoked agent's record is not believed
            verdict = await self._check(agent_id, raw)
            if len(self._verdicts) > 100_000:
                self._verdicts.clear()
            self._verdicts[digest] = (verdict, time.monotonic() + self._security.trust.refresh)
        if not verdict:
            self.unverified += 1
        return verdict

    async def _check(self, agent_id: str, raw: bytes) -> bool:
        try:
            fields = json.loads(raw)
            signature = str(fields.get("signature") or "")
            role = str(fields.get("role") or "")
            kind, _, rest = signature.partition(":")
            data = _signed_bytes(fields)
            if kind == "self":
                record = await self._security.trust.get(agent_id)
                if not record.has_role(role):
                    raise TrustError(f"role {role!r} is not one the trust store gives it")
                record.identity.verifier.verify(b64decode(rest), data)
                return True
            if kind == "admin":
                fingerprint, _, sig = rest.partition(":")
                if not self._security.trust.verify_by_anchor(fingerprint, b64decode(sig), data):
                    raise TrustError("not signed by a trust anchor")
                return True
            raise TrustError("not signed")
        except (ValueError, TypeError, AttributeError, TrustError, InvalidSignature) as exc:
            logger.warning("skipping the registry record of %r: %s", agent_id[:200], str(exc)[:200] or "bad signature")
            return False
