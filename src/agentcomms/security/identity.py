"""Identities: who a process speaks as. One id, two key pairs, from the ``cryptography`` package.

* an Ed25519 key pair signs what anyone must be able to check later: trust-store records
  (by an admin), registry records (by the agent), and messages in ``signature`` mode;
* an X25519 key pair agrees a secret with each peer (static-static Diffie-Hellman), from
  which HKDF derives the keys that authenticate (HMAC-SHA256) and seal (ChaCha20-Poly1305)
  the messages between the two, as NaCl's ``crypto_box`` does.

An identity file holds both private keys (raw, base64url) as JSON, mode 0600. Its public
half (:class:`PublicIdentity`) is what an operator enrols in the trust store.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from pydantic import TypeAdapter, ValidationError

from agentcomms.exceptions import IdentityError
from agentcomms.schemas import AgentId

__all__ = ["Identity", "PublicIdentity", "b64decode", "b64encode", "load_identities"]

_FORMAT = 1
_AGENT_ID: TypeAdapter[str] = TypeAdapter(AgentId)


def b64encode(data: bytes) -> str:
    """base64url without padding: how keys, signatures and tags appear in text."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64decode(text: str | bytes) -> bytes:
    """The bytes of a base64url text, padded or not.

    Raises:
        ValueError: it is not base64url.
    """
    raw = text.encode() if isinstance(text, str) else text
    return base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))


def _raw_public(key: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _raw_private(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def check_id(value: str) -> str:
    """``value`` if it is a valid identity id (an agent id's rules).

    Raises:
        IdentityError: it is not.
    """
    try:
        return _AGENT_ID.validate_python(value)
    except ValidationError:
        raise IdentityError(f"{value!r} is not a valid identity id (letters, digits, _ . : @ -)") from None


@dataclass(frozen=True)
class PublicIdentity:
    """The public half of an identity: its id and its two public keys (raw, 32 bytes each)."""

    id: str
    ed25519: bytes
    x25519: bytes

    @cached_property
    def verifier(self) -> Ed25519PublicKey:
        """The Ed25519 key that checks this identity's signatures."""
        return Ed25519PublicKey.from_public_bytes(self.ed25519)

    @property
    def fingerprint(self) -> str:
        """A short name of the keys: the first 16 hex digits of SHA-256 of the Ed25519 key.

        The same as trust records' ``enrolled_by`` and redrive tokens name an admin key by.
        """
        return hashlib.sha256(self.ed25519).hexdigest()[:16]

    def as_json(self) -> dict[str, str]:
        """``{"id", "ed25519", "x25519"}`` with base64url keys."""
        return {"id": self.id, "ed25519": b64encode(self.ed25519), "x25519": b64encode(self.x25519)}

    def token(self) -> str:
        """One line to copy to an operator (``agentcomms identity trust``): the public identity as JSON."""
        return json.dumps(self.as_json(), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: Any) -> PublicIdentity:
        """Parse :meth:`as_json`'s shape (also the text of :meth:`token`).

        Raises:
            IdentityError: not a public identity.
        """
        if isinstance(raw, str | bytes):
            try:
                raw = json.loads(raw)
            except ValueError:
                raise IdentityError('a public identity is JSON: {"id", "ed25519", "x25519"}') from None
        if not isinstance(raw, dict):
            raise IdentityError("a public identity is a JSON object")
        try:
            ed, x = b64decode(str(raw["ed25519"])), b64decode(str(raw["x25519"]))
        except (KeyError, ValueError):
            raise IdentityError("a public identity needs base64url 'ed25519' and 'x25519' keys") from None
        if len(ed) != 32 or len(x) != 32:
            raise IdentityError("public keys are 32 bytes each")
        return cls(check_id(str(raw.get("id", ""))), ed, x)


class Identity:
    """An identity with its private keys: what a process needs to speak as ``id``."""

    def __init__(self, id: str, signing: Ed25519PrivateKey, exchange: X25519PrivateKey) -> None:
        self.id = check_id(id)
        self._signing = signing
        self._exchange = exchange
        self.public = PublicIdentity(id, _raw_public(signing.public_key()), _raw_public(exchange.public_key()))

    def __repr__(self) -> str:
        return f"Identity({self.id!r}, fingerprint={self.public.fingerprint})"  # never the keys

    @classmethod
    def generate(cls, id: str) -> Identity:
        """A new identity with fresh keys."""
        return cls(id, Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    def sign(self, data: bytes) -> bytes:
        """An Ed25519 signature of ``data``."""
        return self._signing.sign(data)

    def agree(self, peer_x25519: bytes) -> bytes:
        """The X25519 shared secret with a peer's public key (hash it before use: see ``crypto``)."""
        return self._exchange.exchange(X25519PublicKey.from_public_bytes(peer_x25519))

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the private keys to ``path`` (mode 0600, written whole or not at all).

        Raises:
            IdentityError: the file exists (and not ``overwrite``), or cannot be written.
        """
        path = Path(path)
        document = {
            "agentcomms_identity": _FORMAT,
            "id": self.id,
            "ed25519": b64encode(_raw_private(self._signing)),
            "x25519": b64encode(_raw_private(self._exchange)),
            "public": self.public.as_json(),
        }
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if path.exists() and not overwrite:
                raise IdentityError(f"{path} exists: an identity is not replaced without overwrite")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump(document, handle, indent=2)
                handle.write("\n")
            os.replace(temporary, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise IdentityError(f"cannot write identity file {path}: {exc.strerror}") from None
        return path

    @classmethod
    def load(cls, path: str | Path) -> Identity:
        """Read an identity file written by :meth:`save`.

        Raises:
            IdentityError: missing, unreadable, readable by others, or not an identity file.
        """
        path = Path(path)
        try:
            info = path.stat()
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise IdentityError(f"cannot read identity file {path}: {exc.strerror}") from None
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(f"identity file {path} is readable by others: chmod 600 it")
        try:
            raw = json.loads(text)
            if raw.get("agentcomms_identity") != _FORMAT:
                raise ValueError("not an agentcomms identity file")
            signing = Ed25519PrivateKey.from_private_bytes(b64decode(raw["ed25519"]))
            exchange = X25519PrivateKey.from_private_bytes(b64decode(raw["x25519"]))
            return cls(str(raw["id"]), signing, exchange)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise IdentityError(f"{path} is not a valid identity file") from None


def load_identities(folder: str | Path) -> dict[str, Identity]:
    """Every identity file (``*.json``) in ``folder``, by id; an absent folder holds none.

    Raises:
        IdentityError: a file there is not a valid identity file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found: dict[str, Identity] = {}
    for path in sorted(folder.glob("*.json")):
        identity = Identity.load(path)
        found[identity.id] = identity
    return found
