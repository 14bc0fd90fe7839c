"""Security: what one broker needs to authenticate, authorize and seal messages and replies.

A :class:`Security` holds the identities this process may speak as, reads the trust
store, keeps the pair keys it agreed with each peer, remembers recent message ids (replay
refusal), and applies the policy. The broker and its subscriptions call it on the hot
path; everything there is a dictionary look-up and one HMAC once a peer is known (the
first message with a peer costs one trust-store read, one Ed25519 verification of the
record, and one X25519 agreement).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from agentcomms.exceptions import IdentityError, SecurityError, TrustError
from agentcomms.keys import is_reply_stream_of
from agentcomms.schemas import AgentMessage, AgentResponse, MessagePayload, VerifiedMessage
from agentcomms.security.crypto import (
    MSG,
    REPLY,
    PairKeys,
    mac_token_time,
    make_redrive_token,
    make_token,
    open_sealed,
    pair_keys,
    parse_token,
    seal,
    tag_input,
    verify_tag,
)
from agentcomms.security.identity import Identity, load_identities
from agentcomms.security.policy import Policy
from agentcomms.security.trust import TrustRecord, TrustStore
from agentcomms.settings import Settings
from agentcomms.transport import Commands

__all__ = ["Refusal", "Security", "load_anchors"]

logger = logging.getLogger(__name__)

_SEEN_LIMIT = 2_000_000
"""Messages remembered at the most (per process) for replay refusal (about 100 bytes each)."""

_BUCKET_MS = 10_000
"""The replay memory is kept in buckets of this many ms of token time, dropped whole once outside the window."""

_CLOCK_EVERY = 60.0
"""Seconds between measurements of the Redis server's clock (for the timestamps of tokens)."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a received message is not handled: ``kind`` is ``unauthenticated``, ``replayed`` or ``forbidden``."""

    kind: str
    reason: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.reason}"


def load_anchors(settings: Settings) -> list[str]:
    """The admins' public keys: ``AGENTCOMMS_TRUST_ANCHORS``, plus ``<identity folder>/trust_anchors`` if present."""
    anchors = list(settings.trust_anchors)
    path = settings.identities_folder / "trust_anchors"
    try:
        anchors += [line.strip() for line in path.read_text().splitlines() if line.strip() and line[0] != "#"]
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror}") from None
    return list(dict.fromkeys(anchors))


class Security:
    """Identities, trust, pair keys, replay memory and policy for one broker (see the module docstring).

    Args:
        settings: ``security``, ``auth``, ``replay_window``, identities, anchors, policy, sealed intents.
        pipeliner: the broker's connection, for the trust store and the server's clock.
    """

    def __init__(self, settings: Settings, pipeliner: Commands) -> None:
        self.signature_mode = settings.auth == "signature"
        self.window_ms = settings.replay_window * 1000
        self.sealed_intents = frozenset(i.strip().casefold() for i in settings.sealed_intents)
        self.policy = Policy.load(settings.policy_file) if settings.policy_file else None
        self.identities: dict[str, Identity] = load_identities(settings.identities_folder)
        if settings.identity_file is not None:
            own = Identity.load(settings.identity_file)
            self.identities[own.id] = own
        anchors = load_anchors(settings)
        if not anchors:
            raise SecurityError(
                "AGENTCOMMS_SECURITY=on needs the admins' public keys: set AGENTCOMMS_TRUST_ANCHORS "
                f"(or write them to {settings.identities_folder / 'trust_anchors'})"
            )
        self.trust = TrustStore(pipeliner, anchors, refresh=settings.trust_refresh)
        self._pipeliner = pipeliner
        # (own id, peer id) -> the keys agreed, the peer's record they were agreed with, and until when that
        # record counts as fresh for new messages (then it is read again: a revoked or re-keyed peer is seen)
        self._pairs: dict[tuple[str, str], tuple[PairKeys, TrustRecord, float]] = {}
        # replay memory: token time // _BUCKET_MS -> {hash(message id, token time): hash(entry id)}; ints only,
        # so the garbage collector does not track them, and whole buckets go once out of the window
        self._seen: dict[int, dict[int, int]] = {}
        self._seen_count = 0
        self._newest_bucket = 0
        self._offset_ms = 0.0
        self._clock_at = 0.0
        self.refused: Counter[str] = Counter()
        """Messages and replies refused, by kind (``unauthenticated``, ``replayed``, ``forbidden``, ``reply``)."""

    # -- identities and keys ---------------------------------------------------------------------

    @property
    def default_identity(self) -> Identity | None:
        """The identity of a process that holds exactly one (the CLI, a dashboard, a script)."""
        return next(iter(self.identities.values())) if len(self.identities) == 1 else None

    def identity(self, identity_id: str) -> Identity:
        """The identity this process holds for ``identity_id``.

        Raises:
            IdentityError: no identity file for it here: this process may not speak as it.
        """
        found = self.identities.get(identity_id)
        if found is None:
            raise IdentityError(
                f"no identity for {identity_id!r} in this process: it may not send as {identity_id!r} "
                "(create one with `agentcomms identity create` and have an admin enrol it)"
            )
        return found

    def admin_identity(self) -> Identity | None:
        """An identity held here whose key is a trust anchor, if any."""
        return next((i for i in self.identities.values() if self.trust.is_admin_identity(i)), None)

    async def check_enrolled(self) -> None:
        """Warn about identities held here that the trust store does not list with these keys."""
        for identity in self.identities.values():
            try:
                record = await self.trust.get(identity.id)
            except TrustError as exc:
                logger.warning("identity %s: %s; peers will refuse its messages", identity.id, exc)
                continue
            if record.identity != identity.public:
                logger.warning(
                    "identity %s: the trust store lists other keys for it; peers will refuse it", identity.id
                )

    def pair_now(self, own_id: str, peer_id: str) -> PairKeys | None:
        """The keys ``own_id`` shares with ``peer_id`` if agreed with a fresh record of the peer (no I/O)."""
        found = self._pairs.get((own_id, peer_id))
        return found[0] if found is not None and found[2] > time.monotonic() else None

    def known(self, own_id: str, peer_id: str) -> tuple[PairKeys, TrustRecord] | None:
        """The keys and the peer's record of the last agreement, however old (no I/O).

        For the answer to a message verified (or sent) with them: a reply is not refused because
        the record's cache time ran out between the request and its reply.
        """
        found = self._pairs.get((own_id, peer_id))
        return (found[0], found[1]) if found is not None else None

    async def pair(self, own_id: str, peer_id: str) -> tuple[PairKeys, TrustRecord]:
        """The keys ``own_id`` shares with ``peer_id`` and the peer's verified record.

        The record is read again once ``AGENTCOMMS_TRUST_REFRESH`` (30 s) has passed, so a revoked peer is
        refused and a re-keyed one gets new keys.

        Raises:
            IdentityError: this process does not hold ``own_id``.
            TrustError: ``peer_id`` is not a trusted identity.
        """
        found = self._pairs.get((own_id, peer_id))
        if found is not None and found[2] > time.monotonic():
            return found[0], found[1]
        record = await self.trust.get(peer_id)
        keys = found[0] if found is not None and found[1].identity == record.identity else None
        if keys is None:
            keys = pair_keys(self.identity(own_id), record.identity)
        if len(self._pairs) > 100_000:
            self._pairs.clear()
        self._pairs[(own_id, peer_id)] = (keys, record, time.monotonic() + self.trust.refresh)
        return keys, record

    # -- the server's clock ----------------------------------------------------------------------

    async def sync_clock(self) -> None:
        """Measure the Redis server's clock against the monotonic one (tokens carry server time)."""
        sent = time.monotonic()
        seconds, micros = await self._pipeliner.call("TIME", replay=True)
        now = time.monotonic()
        self._offset_ms = int(seconds) * 1000 + int(micros) / 1000 - (sent + now) * 500
        self._clock_at = now

    def server_ms(self) -> int:
        """This process's estimate of the Redis server's clock, in ms (measured again every minute)."""
        now = time.monotonic()
        if now - self._clock_at > _CLOCK_EVERY:
            self._clock_at = now
            measuring = self._pipeliner.call("TIME", replay=True)
            measuring.add_done_callback(lambda done: self._clock_measured(done, now))
        return int(now * 1000 + self._offset_ms)

    def _clock_measured(self, done: Any, sent: float) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        seconds, micros = done.result()
        self._offset_ms = int(seconds) * 1000 + int(micros) / 1000 - (sent + time.monotonic()) * 500

    # -- sending -------------------------------------------------------------------------------

    def wants_seal(self, message: AgentMessage, seal_it: bool | None) -> bool:
        """Whether ``message`` is to be sealed: asked for, or its intent is one of ``AGENTCOMMS_SEALED_INTENTS``."""
        if seal_it is not None:
            return seal_it
        return bool(self.sealed_intents) and str(message.intent).casefold() in self.sealed_intents

    def ready(self, message: AgentMessage, seal_it: bool | None) -> bool:
        """Whether ``message`` can be signed as it is (no I/O): keys agreed and fresh, nothing to seal."""
        found = self._pairs.get((message.sender_id, message.recipient_id))  # only made for identities held here
        if found is None or found[2] <= time.monotonic() or seal_it:
            return False
        return seal_it is not None or not self.sealed_intents or not self.wants_seal(message, None)

    async def prepare(self, message: AgentMessage, *, seal_it: bool | None = None) -> AgentMessage:
        """Agree keys with the recipient (once) and seal the payload if asked; the message to encode.

        Raises:
            IdentityError: this process does not hold the sender's identity.
            TrustError: the recipient is not a trusted identity.
        """
        keys, _ = await self.pair(message.sender_id, message.recipient_id)
        if not self.wants_seal(message, seal_it):
            return message
        payload = message.payload
        plaintext = json.dumps({"data": payload.data, "context": payload.context}, separators=(",", ":")).encode()
        sealed = seal(keys, plaintext, message.message_id.encode())
        bare = MessagePayload(
            priority=payload.priority,
            requires_response=payload.requires_response,
            response_timeout=payload.response_timeout,
        )
        return message.model_copy(update={"payload": bare, "sealed": sealed})

    def token(self, message: AgentMessage, body: bytes) -> bytes:
        """The authentication token of an encoded message (after :meth:`prepare`)."""
        ts = self.server_ms()
        if self.signature_mode:
            return make_token(MSG, ts, body, keys=None, signer=self.identities[message.sender_id])
        keys = self._pairs[(message.sender_id, message.recipient_id)][0]
        return b"v1.h.%d.%s" % (ts, keys.hextag(b"%s%d\n%s" % (MSG, ts, body)))  # make_token(), inline

    # -- receiving -----------------------------------------------------------------------------

    def _refuse(self, kind: str, reason: str) -> Refusal:
        self.refused[kind] += 1
        return Refusal(kind, reason)

    def _remember(self, message_id: str, ts: int, entry_id: str) -> bool:
        """Record a message (its id and token time) in its entry; ``False`` if it came before in another entry.

        The same entry again is a redelivery (a handler failed, an instance died), not a replay.
        Only messages within the window of their arrival get here, so a bucket of token times
        more than twice the window older than the newest can be forgotten.
        """
        bucket = ts // _BUCKET_MS
        seen = self._seen.get(bucket)
        if seen is None:
            seen = self._seen[bucket] = {}
            if bucket > self._newest_bucket:
                self._newest_bucket = bucket
                self._forget(bucket - int(2 * self.window_ms) // _BUCKET_MS - 1)
        key, entry = hash((message_id, ts)), hash(entry_id)
        found = seen.get(key)
        if found is not None:
            return found == entry
        seen[key] = entry
        self._seen_count += 1
        if self._seen_count > _SEEN_LIMIT:  # a rate above ~4,000 messages/s for 4 minutes: forget early
            self._forget(min(self._seen) + 1)
        return True

    def _forget(self, before: int) -> None:
        """Drop the buckets older than ``before``."""
        for bucket in [b for b in self._seen if b < before]:
            self._seen_count -= len(self._seen.pop(bucket))

    def check_now(
        self, message: AgentMessage, body: bytes, token: bytes | None, entry_id: str, recipient_role: str
    ) -> AgentMessage | Refusal | None:
        """:meth:`check` without I/O in the common case (a known sender, an HMAC token).

        ``None``: not that case, await :meth:`check`.
        """
        found = self._pairs.get((message.recipient_id, message.sender_id))
        if found is None or token is None or found[2] <= time.monotonic():
            return None
        ts = mac_token_time(token, MSG, body, found[0])
        if ts is None:  # another kind of token, or a wrong one: check() says which
            return None
        return self._admit(message, entry_id, ts, found[0], found[1], recipient_role)

    async def check(
        self, message: AgentMessage, body: bytes, token: bytes | None, entry_id: str, recipient_role: str
    ) -> AgentMessage | Refusal:
        """Authenticate, refuse replays, authorize, unseal: the message to hand over, or why not.

        ``entry_id`` is the inbox entry's id: the Redis server's clock when it was stored.
        """
        verified = await self._authenticate(message, body, token)
        if isinstance(verified, Refusal):
            return verified
        record, keys, ts = verified
        return self._admit(message, entry_id, ts, keys, record, recipient_role)

    def _admit(
        self, message: AgentMessage, entry_id: str, ts: int, keys: PairKeys, record: TrustRecord, recipient_role: str
    ) -> AgentMessage | Refusal:
        """After authentication: the replay window and memory, the reply stream, the policy, unsealing."""
        entry_ms = int(entry_id.partition("-")[0])
        if abs(entry_ms - ts) > self.window_ms:
            return self._refuse(
                "replayed", f"stamped {abs(entry_ms - ts) / 1000:.0f}s away from its arrival (window "
                f"{self.window_ms / 1000:g}s)"
            )  # fmt: skip
        if not self._remember(message.message_id, ts, entry_id):
            return self._refuse("replayed", f"message id {message.message_id} was handled already")
        if message.reply_to is not None and not is_reply_stream_of(message.reply_to, message.sender_id):
            return self._refuse("unauthenticated", "reply_to is not the sender's own reply stream")
        if self.policy is not None and not self.policy.allows(record.roles, str(message.intent), recipient_role):
            return self._refuse(
                "forbidden", f"{message.sender_id} (roles {', '.join(record.roles) or 'none'}) may not send "
                f"{message.intent} to a {recipient_role}"
            )  # fmt: skip
        if message.sealed is not None:
            try:
                plain = json.loads(open_sealed(keys, message.sealed, message.message_id.encode()))
                payload = message.payload.model_copy(update={"data": plain["data"], "context": plain["context"]})
            except (ValueError, KeyError, TypeError):
                return self._refuse("unauthenticated", "the sealed payload cannot be opened")
            message = message.model_copy(update={"payload": payload, "sealed": None})
        if not isinstance(message, VerifiedMessage):  # the subscription parses as one; others may not
            message = VerifiedMessage.model_construct(message.model_fields_set, **dict(message))
        message._sender_roles = record.roles
        return message

    async def _authenticate(
        self, message: AgentMessage, body: bytes, token: bytes | None
    ) -> tuple[TrustRecord, PairKeys, int] | Refusal:
        """The sender's record, the pair's keys and the token's time, if the token authenticates the body."""
        if token is None:
            return self._refuse("unauthenticated", "no authentication token")
        try:
            parsed = parse_token(token)
        except ValueError:
            return self._refuse("unauthenticated", "malformed authentication token")
        try:
            keys, record = await self.pair(message.recipient_id, message.sender_id)
        except (TrustError, IdentityError) as exc:
            return self._refuse("unauthenticated", str(exc))
        if parsed.alg == "r":  # sent back from the dead letters by an admin, who signed it afresh
            if not self.trust.verify_by_anchor(parsed.signer, parsed.tag, tag_input(MSG, parsed.ts, body)):
                return self._refuse("unauthenticated", "the redrive token is not an admin's")
        elif not verify_tag(parsed, MSG, body, keys=keys, sender=record.identity):
            return self._refuse("unauthenticated", f"the token does not match {message.sender_id!r}'s keys")
        return record, keys, parsed.ts

    # -- replies -------------------------------------------------------------------------------

    def reply_body(self, response: AgentResponse, *, own_id: str, peer_id: str, sealed: bool) -> AgentResponse:
        """``response`` with its data sealed for the caller, when the request was sealed."""
        if not sealed or response.data is None:
            return response
        keys = self._pairs[(own_id, peer_id)][0]
        plaintext = json.dumps(response.data, separators=(",", ":")).encode()
        return response.model_copy(
            update={"data": None, "sealed": seal(keys, plaintext, (response.correlation_id or "").encode())}
        )

    def reply_token(self, body: bytes, *, own_id: str, peer_id: str) -> bytes:
        """The token of a reply from ``own_id`` to ``peer_id`` (who just sent us a verified request)."""
        ts = self.server_ms()
        if self.signature_mode:
            return make_token(REPLY, ts, body, keys=None, signer=self.identities[own_id])
        keys = self._pairs[(own_id, peer_id)][0]
        return b"v1.h.%d.%s" % (ts, keys.hextag(b"%s%d\n%s" % (REPLY, ts, body)))  # make_token(), inline

    def open_reply(
        self, response: AgentResponse, body: bytes, token: bytes | None, *, own_id: str, expected: str
    ) -> AgentResponse | None:
        """The verified reply (unsealed), or ``None``: from someone else than asked, forged, or unauthenticated."""
        known = self._pairs.get((own_id, expected))  # agreed when the request was sent: however old now
        if response.responder_id != expected or token is None or known is None:
            self.refused["reply"] += 1
            return None
        keys, record = known[0], known[1]
        if mac_token_time(token, REPLY, body, keys) is None:  # not the common case: check it in full
            try:
                parsed = parse_token(token)
            except ValueError:
                self.refused["reply"] += 1
                return None
            if not verify_tag(parsed, REPLY, body, keys=keys, sender=record.identity):
                self.refused["reply"] += 1
                return None
        if response.sealed is not None:
            try:
                data = json.loads(open_sealed(keys, response.sealed, (response.correlation_id or "").encode()))
            except ValueError:
                self.refused["reply"] += 1
                return None
            response = response.model_copy(update={"data": data, "sealed": None})
        return response

    def redrive_token(self, body: bytes) -> bytes | None:
        """An admin's fresh token for a dead letter sent back (``None``: this process holds no admin identity)."""
        admin = self.admin_identity()
        return make_redrive_token(admin, self.server_ms(), body) if admin is not None else None

    def record_of(self, identity_id: str) -> TrustRecord | None:
        """The cached trust record of ``identity_id`` (no I/O)."""
        return self.trust.cached(identity_id)
