"""The test vectors of docs/protocol.md ("Security"), recomputed from their fixed keys by the library.

A client in another language checks itself against the same values; this test keeps the
page true to the code. ``python tests/test_protocol_vectors.py`` prints the block.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agentcomms.security import Identity, TrustRecord, b64encode, canonical_json
from agentcomms.security.crypto import MSG, REPLY, make_redrive_token, make_token, open_sealed, pair_keys
from agentcomms.security.records import _signed_bytes
from agentcomms.security.trust import key_fingerprint

PROTOCOL = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def fixed(identity_id: str, seed: int) -> Identity:
    """An identity whose private keys are 32 bytes of ``seed`` (Ed25519) and ``seed + 1`` (X25519)."""
    return Identity(
        identity_id,
        Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32),
        X25519PrivateKey.from_private_bytes(bytes([seed + 1]) * 32),
    )


def hkdf(secret: bytes, label: bytes, a: bytes, b: bytes) -> bytes:
    """As the page says: HKDF-SHA256, no salt, info = label || the smaller public key || the larger."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label + min(a, b) + max(a, b)).derive(secret)


def vectors() -> list[tuple[str, str]]:
    """Each vector's name and value, in the page's order."""
    john, jane, admin = fixed("agent.cmo.john", 1), fixed("agent.cso.jane", 3), fixed("admin.ops", 9)
    keys = pair_keys(john, jane.public)
    secret = john.agree(jane.public.x25519)
    assert secret == jane.agree(john.public.x25519)
    mac_key = hkdf(secret, b"agentcomms v1 mac", john.public.x25519, jane.public.x25519)
    seal_key = hkdf(secret, b"agentcomms v1 seal", john.public.x25519, jane.public.x25519)
    assert keys.mac == mac_key  # the library derives what the page specifies
    ts = 1795660000000
    message = (
        b'{"message_id":"m-1","sender_id":"agent.cmo.john","recipient_id":"agent.cso.jane",'
        b'"intent":"request_knowledge","payload":{"data":{"query":"Q4 pipeline?"},"priority":"normal",'
        b'"requires_response":true,"response_timeout":30.0,"context":{}},"timestamp":"2026-11-26T00:00:00Z",'
        b'"reply_to":"ac:{reply.agent.cmo.john.1a2b3c4d5e6f}:replies","correlation_id":"m-1"}'
    )
    reply = b'{"success":true,"data":{"pipeline":"$2.4M"},"correlation_id":"m-1","responder_id":"agent.cso.jane"}'
    nonce = bytes(range(12))
    plaintext = b'{"data":{"query":"Q4 pipeline?"},"context":{}}'
    sealed = b64encode(nonce + ChaCha20Poly1305(seal_key).encrypt(nonce, plaintext, b"m-1"))
    assert open_sealed(pair_keys(jane, john.public), sealed, b"m-1") == plaintext
    unsigned = TrustRecord(john.public, ("cmo",), False, key_fingerprint(admin.public.ed25519), b"")
    record = TrustRecord(john.public, ("cmo",), False, unsigned.enrolled_by, admin.sign(unsigned.signed_bytes()))
    registry = {"agent_id": "agent.cmo.john", "user_name": "john", "role": "cmo", "department": "executive",
                "capabilities": [], "supported_intents": [], "version": "1.0.0", "metadata": {}}  # fmt: skip
    return [
        ("john ed25519 private", (bytes([1]) * 32).hex()),
        ("john x25519 private", (bytes([2]) * 32).hex()),
        ("john public", john.public.token()),
        ("jane ed25519 private", (bytes([3]) * 32).hex()),
        ("jane x25519 private", (bytes([4]) * 32).hex()),
        ("jane public", jane.public.token()),
        ("admin ed25519 private", (bytes([9]) * 32).hex()),
        ("admin anchor", b64encode(admin.public.ed25519)),
        ("admin fingerprint", key_fingerprint(admin.public.ed25519)),
        ("x25519 secret", secret.hex()),
        ("mac key", mac_key.hex()),
        ("seal key", seal_key.hex()),
        ("message body", message.decode()),
        ("ts", str(ts)),
        ("message token (h)", make_token(MSG, ts, message, keys=keys, signer=None).decode()),
        ("message token (e)", make_token(MSG, ts, message, keys=None, signer=john).decode()),
        ("reply body", reply.decode()),
        ("reply token (h)", make_token(REPLY, ts + 7, reply, keys=keys, signer=None).decode()),
        ("redrive token (r)", make_redrive_token(admin, ts + 9, message).decode()),
        ("seal plaintext", plaintext.decode()),
        ("seal nonce", nonce.hex()),
        ("sealed", sealed),
        ("trust record", canonical_json(record.as_json()).decode()),
        ("registry signed bytes", _signed_bytes(registry).decode().replace("\n", "\\n")),
        ("registry signature", "self:" + b64encode(john.sign(_signed_bytes(registry)))),
    ]


def block() -> str:
    return "\n".join(f"{name}: {value}" for name, value in vectors())


def test_the_vectors_on_the_protocol_page_are_what_the_library_computes() -> None:
    page = PROTOCOL.read_text(encoding="utf-8")
    found = re.search(r"<!-- vectors -->\n```text\n(.*?)\n```", page, re.S)
    assert found is not None, "docs/protocol.md has no vectors block"
    assert found.group(1) == block()


def test_the_vector_keys_check_what_they_sign() -> None:
    john = fixed("agent.cmo.john", 1)
    values = dict(vectors())
    record = json.loads(values["trust record"])
    assert record["id"] == "agent.cmo.john" and record["roles"] == ["cmo"] and not record["admin"]
    assert values["john public"] == john.public.token()


if __name__ == "__main__":
    sys.stdout.write(block() + "\n")
