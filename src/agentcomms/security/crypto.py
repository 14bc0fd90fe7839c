r"""The per-message cryptography: keys between two identities, authentication tags, sealing.

Every primitive is the ``cryptography`` package's or the standard library's; this module
only combines them, as docs/protocol.md specifies (with test vectors):

* **Pair keys.** For identities A and B, ``secret = X25519(a, B) = X25519(b, A)``;
  ``HKDF-SHA256(secret, salt="", info=label || min(A.x25519, B.x25519) || max(...))``
  gives a 32-byte key for each label: ``agentcomms v1 mac`` and ``agentcomms v1 seal``.
  Either side computes it; nobody else can.
* **Authentication** of a message or reply: a token ``v1.<alg>.<ts>.<tag>`` beside the
  body (the entry field ``a``), where ``ts`` is the sender's estimate of the Redis
  server's clock in ms, and ``tag`` (lower-case hex) is, over
  ``context || ts || "\n" || body`` (``body`` the exact JSON bytes of the entry),
  ``HMAC-SHA256(mac key)`` for ``h`` or an Ed25519 signature by the sender for ``e``.
  The contexts are ``agentcomms v1 msg\n`` and ``agentcomms v1 reply\n``.
* **Sealing**: ``ChaCha20-Poly1305(seal key)``, a random 96-bit nonce, the message id as
  associated data; the sealed text is ``base64url(nonce || ciphertext)``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from binascii import unhexlify
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agentcomms.security.identity import Identity, PublicIdentity, b64decode, b64encode

__all__ = [
    "MSG",
    "REPLY",
    "PairKeys",
    "Token",
    "make_redrive_token",
    "mac_token_time",
    "make_token",
    "open_sealed",
    "pair_keys",
    "parse_token",
    "seal",
    "tag_input",
    "verify_tag",
]

MSG = b"agentcomms v1 msg\n"
REPLY = b"agentcomms v1 reply\n"
_MAC_LABEL = b"agentcomms v1 mac"
_SEAL_LABEL = b"agentcomms v1 seal"


@dataclass(frozen=True, slots=True)
class PairKeys:
    """The keys one identity shares with one peer."""

    mac: bytes
    sealer: ChaCha20Poly1305
    keyed: HMAC = field(init=False, repr=False, compare=False)
    """HMAC-SHA256 with ``mac`` set up once: each tag copies it (no key schedule per message)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "keyed", HMAC(self.mac, hashes.SHA256()))

    def hextag(self, data: bytes) -> bytes:
        """``HMAC-SHA256(mac, data)`` in lower-case hex."""
        h = self.keyed.copy()
        h.update(data)
        return h.finalize().hex().encode()


def _derive(secret: bytes, label: bytes, a: bytes, b: bytes) -> bytes:
    low, high = sorted((a, b))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label + low + high).derive(secret)


def pair_keys(own: Identity, peer: PublicIdentity) -> PairKeys:
    """The keys ``own`` shares with ``peer`` (the same both ways round)."""
    secret = own.agree(peer.x25519)
    mine = own.public.x25519
    return PairKeys(
        mac=_derive(secret, _MAC_LABEL, mine, peer.x25519),
        sealer=ChaCha20Poly1305(_derive(secret, _SEAL_LABEL, mine, peer.x25519)),
    )


def tag_input(context: bytes, ts: int, body: bytes) -> bytes:
    r"""The bytes a tag covers: ``context || ts || "\n" || body``."""
    return b"%s%d\n%s" % (context, ts, body)


@dataclass(frozen=True, slots=True)
class Token:
    """A parsed authentication token."""

    alg: str
    """``h`` (HMAC-SHA256 with the pair's mac key), ``e`` (Ed25519 by the sender) or ``r`` (Ed25519 by an
    admin who redrove the message from the dead letters)."""
    ts: int
    tag: bytes
    signer: str = ""
    """For ``r``: the fingerprint of the admin key that signed."""


def make_token(context: bytes, ts: int, body: bytes, *, keys: PairKeys | None, signer: Identity | None) -> bytes:
    """The token for ``body``: HMAC with ``keys``, or an Ed25519 signature by ``signer``."""
    data = b"%s%d\n%s" % (context, ts, body)  # tag_input(), inline: this is on every message's path
    if keys is not None:
        return b"v1.h.%d.%s" % (ts, keys.hextag(data))
    assert signer is not None
    return b"v1.e.%d.%s" % (ts, signer.sign(data).hex().encode())


def parse_token(raw: bytes) -> Token:
    """The parts of a token.

    Raises:
        ValueError: it is not a v1 token.
    """
    version, alg, ts, tag = raw.split(b".", 3)
    if version != b"v1" or alg not in (b"h", b"e", b"r"):
        raise ValueError("not a v1 token")
    if alg == b"r":
        signer, _, tag = tag.partition(b".")
        return Token("r", int(ts), bytes.fromhex(tag.decode()), signer.decode())
    return Token(alg.decode(), int(ts), bytes.fromhex(tag.decode()))


def mac_token_time(token: bytes, context: bytes, body: bytes, keys: PairKeys) -> int | None:
    """The time of an ``h`` token that authenticates ``body`` with ``keys``; ``None`` for any other token.

    The common case in one step (no parsing into parts); :func:`parse_token` and
    :func:`verify_tag` handle every kind and say what is wrong.
    """
    if token[:5] != b"v1.h.":
        return None
    ts, _, tag = token[5:].partition(b".")
    if not ts.isdigit() or ts[:1] == b"0" or len(tag) != 64:  # as make_token writes it: bytes signed = bytes sent
        return None
    h = keys.keyed.copy()
    h.update(b"%s%s\n%s" % (context, ts, body))
    try:
        h.verify(unhexlify(tag))  # constant-time
    except (InvalidSignature, ValueError):  # binascii.Error is a ValueError
        return None
    return int(ts)


def make_redrive_token(admin: Identity, ts: int, body: bytes) -> bytes:
    """An admin's token for a message it sends back from the dead letters: ``v1.r.<ts>.<fingerprint>.<sig>``."""
    signature = admin.sign(tag_input(MSG, ts, body))
    fingerprint = hashlib.sha256(admin.public.ed25519).hexdigest()[:16]  # as trust.key_fingerprint names it
    return b"v1.r.%d.%s.%s" % (ts, fingerprint.encode(), signature.hex().encode())


def verify_tag(token: Token, context: bytes, body: bytes, *, keys: PairKeys, sender: PublicIdentity) -> bool:
    """Whether ``token`` authenticates ``body`` as the sender's (constant-time for HMAC)."""
    data = tag_input(context, token.ts, body)
    if token.alg == "h":
        return hmac.compare_digest(keys.hextag(data), token.tag.hex().encode())
    try:
        sender.verifier.verify(token.tag, data)
    except InvalidSignature:
        return False
    return True


def seal(keys: PairKeys, plaintext: bytes, associated: bytes) -> str:
    """``plaintext`` encrypted for the pair: base64url(nonce || ciphertext and tag)."""
    nonce = os.urandom(12)
    return b64encode(nonce + keys.sealer.encrypt(nonce, plaintext, associated))


def open_sealed(keys: PairKeys, sealed: str, associated: bytes) -> bytes:
    """The plaintext of :func:`seal`'s output.

    Raises:
        ValueError: it was not sealed for this pair and this message, or was altered.
    """
    try:
        raw = b64decode(sealed)
        return keys.sealer.decrypt(raw[:12], raw[12:], associated)
    except (InvalidTag, ValueError):
        raise ValueError("cannot open the sealed payload: not sealed for this pair and message, or altered") from None
