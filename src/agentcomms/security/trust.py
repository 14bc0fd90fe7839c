"""The trust store: which identities exist, their public keys and roles, as an admin enrolled them.

Records live in the Redis hash ``ac:{trust}:identities``; each is signed by an admin
(Ed25519) over its canonical bytes. Who is an admin is not in Redis: every process is
given the admins' public keys (``AGENTCOMMS_TRUST_ANCHORS``), so a record written by
anyone else, or altered, is rejected whatever the Redis permissions. With Redis ACLs
(``agentcomms acl``) only the admin user may write the hash at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agentcomms import keys
from agentcomms.exceptions import IdentityError, PermissionDeniedError, TrustError
from agentcomms.security.identity import Identity, PublicIdentity, b64decode, b64encode
from agentcomms.transport import Commands

__all__ = ["CACHE_SECONDS", "TrustRecord", "TrustStore", "canonical_json", "key_fingerprint"]

_CONTEXT = b"agentcomms v1 trust\n"
CACHE_SECONDS = 30.0
"""How long a verified record is used without reading it again by default (``AGENTCOMMS_TRUST_REFRESH``)."""


def canonical_json(value: Any) -> bytes:
    """The canonical JSON of records that are signed: sorted keys, no spaces, ASCII only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class TrustRecord:
    """An enrolled identity: its public keys, its roles, whether it is an admin, and who enrolled it."""

    identity: PublicIdentity
    roles: tuple[str, ...]
    admin: bool
    enrolled_by: str
    """Fingerprint of the admin key that signed the record."""
    signature: bytes

    @property
    def id(self) -> str:
        """The identity's id."""
        return self.identity.id

    def has_role(self, role: str) -> bool:
        """Whether ``role`` is one of the record's roles (compared case-folded)."""
        wanted = role.strip().casefold()
        return any(r.strip().casefold() == wanted for r in self.roles)

    def fields(self) -> dict[str, Any]:
        """What the admin signs."""
        return {
            **self.identity.as_json(),
            "roles": sorted(self.roles),
            "admin": self.admin,
            "enrolled_by": self.enrolled_by,
        }

    def signed_bytes(self) -> bytes:
        r"""``"agentcomms v1 trust\n" || canonical_json(fields)``."""
        return _CONTEXT + canonical_json(self.fields())

    def as_json(self) -> dict[str, Any]:
        """The stored form: the fields and the signature (base64url)."""
        return {**self.fields(), "signature": b64encode(self.signature)}

    @classmethod
    def from_json(cls, raw: Any) -> TrustRecord:
        """Parse the stored form (not verified: see :meth:`TrustStore.verify`).

        Raises:
            TrustError: not a trust record.
        """
        try:
            if isinstance(raw, bytes | str):
                raw = json.loads(raw)
            roles = raw["roles"]
            if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
                raise ValueError("roles must be a list of names")
            return cls(
                identity=PublicIdentity.from_json(raw),
                roles=tuple(roles),
                admin=bool(raw["admin"]),
                enrolled_by=str(raw["enrolled_by"]),
                signature=b64decode(str(raw["signature"])),
            )
        except (ValueError, KeyError, TypeError, IdentityError) as exc:
            raise TrustError(f"not a valid trust record: {exc}") from None


def key_fingerprint(ed25519: bytes) -> str:
    """The name of an admin (anchor) key in records and tokens: the first 16 hex digits of SHA-256 of the key."""
    return hashlib.sha256(ed25519).hexdigest()[:16]


_fingerprint = key_fingerprint


class TrustStore:
    """Reads and (for an admin) writes the trust store; every record read is checked against the anchors.

    Args:
        pipeliner: the connection.
        anchors: the admins' Ed25519 public keys (raw or base64url).
    """

    def __init__(self, pipeliner: Commands, anchors: Sequence[bytes | str], *, refresh: float = CACHE_SECONDS) -> None:
        self._pipeliner = pipeliner
        self.refresh = refresh
        """Seconds a verified record is used before it is read again."""
        self._anchors: dict[str, Ed25519PublicKey] = {}
        for anchor in anchors:
            raw = b64decode(anchor) if isinstance(anchor, str) else anchor
            if len(raw) != 32:
                raise IdentityError("a trust anchor is a base64url Ed25519 public key (32 bytes)")
            self._anchors[_fingerprint(raw)] = Ed25519PublicKey.from_public_bytes(raw)
        self._cache: dict[str, tuple[float, TrustRecord]] = {}
        self._reading: dict[str, asyncio.Future[TrustRecord]] = {}

    @property
    def has_anchors(self) -> bool:
        """Whether any admin key is configured (without one, no record can be trusted)."""
        return bool(self._anchors)

    def is_admin_identity(self, identity: Identity) -> bool:
        """Whether ``identity``'s signing key is a trust anchor."""
        return _fingerprint(identity.public.ed25519) in self._anchors

    def verify(self, record: TrustRecord) -> None:
        """Check that an anchor signed ``record``.

        Raises:
            TrustError: no anchor signed it (unknown admin, altered record).
        """
        anchor = self._anchors.get(record.enrolled_by)
        if anchor is None:
            raise TrustError(f"the record of {record.id!r} is signed by an unknown admin key ({record.enrolled_by})")
        try:
            anchor.verify(record.signature, record.signed_bytes())
        except InvalidSignature:
            raise TrustError(f"the record of {record.id!r} does not match its admin's signature") from None

    def verify_by_anchor(self, fingerprint: str, signature: bytes, data: bytes) -> bool:
        """Whether the anchor named by ``fingerprint`` signed ``data``."""
        anchor = self._anchors.get(fingerprint)
        if anchor is None:
            return False
        try:
            anchor.verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def cached(self, identity_id: str) -> TrustRecord | None:
        """The verified record of ``identity_id`` if read within the last :attr:`refresh` seconds."""
        found = self._cache.get(identity_id)
        if found is None or found[0] < time.monotonic():
            return None
        return found[1]

    async def get(self, identity_id: str) -> TrustRecord:
        """The verified record of ``identity_id`` (read again at most every :attr:`refresh` seconds).

        Raises:
            TrustError: not enrolled, or its record is not signed by an anchor.
        """
        found = self.cached(identity_id)
        if found is not None:
            return found
        reading = self._reading.get(identity_id)
        if reading is None:  # one read for all the messages that find the record stale at once
            reading = asyncio.ensure_future(self._read(identity_id))
            self._reading[identity_id] = reading
            reading.add_done_callback(lambda _: self._reading.pop(identity_id, None))
        return await asyncio.shield(reading)

    async def _read(self, identity_id: str) -> TrustRecord:
        raw = await self._pipeliner.call("HGET", keys.TRUST_IDENTITIES, identity_id, replay=True)
        if raw is None:
            self._cache.pop(identity_id, None)
            raise TrustError(f"identity {identity_id!r} is not in the trust store")
        record = TrustRecord.from_json(raw)
        if record.id != identity_id:
            raise TrustError(f"the trust record stored for {identity_id!r} is {record.id!r}'s")
        self.verify(record)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[identity_id] = (time.monotonic() + self.refresh, record)
        return record

    async def records(self) -> list[tuple[TrustRecord | None, str]]:
        """Every stored record with its verdict: ``(record, "")`` if valid, ``(record or None, why)`` if not."""
        stored = await self._pipeliner.call("HGETALL", keys.TRUST_IDENTITIES, replay=True)
        items = iter(stored or ())
        out: list[tuple[TrustRecord | None, str]] = []
        for key, value in zip(items, items, strict=False):
            name = key.decode(errors="replace")
            try:
                record = TrustRecord.from_json(value)
                if record.id != name:
                    raise TrustError(f"stored under {name!r}")
                self.verify(record)
                out.append((record, ""))
            except TrustError as exc:
                out.append((None, f"{name}: {exc}"))
        return out

    def _require_admin(self, admin: Identity) -> str:
        fingerprint = _fingerprint(admin.public.ed25519)
        if fingerprint not in self._anchors:
            raise PermissionDeniedError(
                f"{admin.id!r} is not an admin: its key is not among the trust anchors (AGENTCOMMS_TRUST_ANCHORS)"
            )
        return fingerprint

    async def enroll(
        self, admin: Identity, identity: PublicIdentity, *, roles: Sequence[str] = (), is_admin: bool = False
    ) -> TrustRecord:
        """Sign and store the record of ``identity`` (replacing any earlier one).

        Raises:
            PermissionDeniedError: ``admin`` is not a trust anchor.
        """
        fingerprint = self._require_admin(admin)
        names = tuple(r.strip() for r in roles if r.strip())
        unsigned = TrustRecord(identity, names, is_admin, fingerprint, b"")
        record = TrustRecord(identity, names, is_admin, fingerprint, admin.sign(unsigned.signed_bytes()))
        await self._pipeliner.call(
            "HSET", keys.TRUST_IDENTITIES, identity.id, canonical_json(record.as_json()), replay=True
        )
        self._cache.pop(identity.id, None)
        return record

    async def revoke(self, admin: Identity, identity_id: str) -> bool:
        """Remove ``identity_id`` from the trust store; ``False`` if it was not there.

        Raises:
            PermissionDeniedError: ``admin`` is not a trust anchor.
        """
        self._require_admin(admin)
        self._cache.pop(identity_id, None)
        return bool(await self._pipeliner.call("HDEL", keys.TRUST_IDENTITIES, identity_id, replay=True))
