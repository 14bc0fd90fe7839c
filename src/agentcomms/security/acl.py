"""Redis ACL users per identity: what each process may touch in Redis, whatever its code does.

Redis 7 ACL rules with selectors, derived from the commands the library sends (see
docs/protocol.md and ``transport/lua``). One Redis user per identity, named after it:

* ``sender`` (a script, the CLI): read the trust store and the registry; append to any
  inbox through the ``send`` script (XLEN, XADD, and ZMSCORE / ZADD / ZREMRANGEBYSCORE /
  PEXPIRE on the inbox's dedup set); read and trim its own reply streams
  (``ac:{reply.<id>.<12 hex>}:replies``); publish on the event feed (the scripts do when
  someone listens). No reply streams of others, no registry writes, no subscriptions.
* ``dashboard``: a sender that may also ``SUBSCRIBE`` to the event feed and read the record
  and the dead letters.
* ``agent``: a sender that also reads, acknowledges, claims and dead-letters its own
  inbox (``ac:{<id>}:*``), writes replies to callers' reply streams (XADD, PEXPIRE),
  records what it handled (its own ``ac:{<id>}:record``), adds itself to the dead-letter and
  record indexes, and runs the registry scripts (the registry's
  shared hashes and index sets, its own instance set).
* ``admin``: every command on ``ac:*`` keys except the dangerous ones (FLUSHALL, CONFIG,
  KEYS, DEBUG, SHUTDOWN, MODULE, CLIENT KILL, SCRIPT FLUSH ...), plus the ``ACL``
  subcommands that ``agentcomms acl apply`` needs: so it is as powerful as the Redis
  operator, and its password belongs where the admin identity is.

Commands a script runs are checked against the caller's user too, so a user may not make
a script do more than it may do itself. What least privilege leaves out, and what the
ACLs cannot prevent, is listed in docs/security.md ("Redis ACLs").

Passwords are generated (``secrets.token_urlsafe``) into one file per identity (mode
0600); rules, ACL files and ``ACL SETUSER`` commands carry only their SHA-256.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from agentcomms import keys
from agentcomms.exceptions import IdentityError
from agentcomms.security.identity import check_id

__all__ = [
    "RESERVED_IDS",
    "AclUser",
    "Kind",
    "acl_rules",
    "acl_users",
    "check_acl_id",
    "load_or_create_password",
    "password_file",
    "password_hash",
    "render_acl_file",
    "setuser_commands",
]

logger = logging.getLogger(__name__)


class Kind(StrEnum):
    """What a process with an identity does, which decides its Redis permissions."""

    AGENT = "agent"
    """Handles an inbox of its own (a BaseAgent, ``run-agent``), and sends and asks like a sender."""
    SENDER = "sender"
    """Sends and asks only (the CLI, a script, a MessageSender)."""
    DASHBOARD = "dashboard"
    """A sender that may also follow the live event feed."""
    ADMIN = "admin"
    """The admin: the trust store, dead letters of every agent, the ACLs themselves."""


RESERVED_IDS = frozenset({"default", "registry", "trust"})
"""Ids that cannot be ACL users: Redis's own ``default`` user, and the hash tags of the registry and the trust store."""

_RESERVED_PREFIX = "reply."
"""An id starting like this would own keys that look like reply streams."""

_HEX12 = "[0-9a-f]" * 12
"""The 12 hex digits that end a broker's client id (``<id>.<uuid4 hex[:12]>``): its reply stream's name."""

_GLOB_SPECIAL = frozenset("*?[]\\^")

_PASSWORD_SUFFIX = ".redis-password"


def _glob(text: str) -> str:
    """``text`` as a Redis glob pattern that matches only itself."""
    return "".join("\\" + c if c in _GLOB_SPECIAL else c for c in text)


def check_acl_id(identity_id: str) -> str:
    """``identity_id`` if it can name an ACL user whose patterns match only its own keys.

    Raises:
        IdentityError: not a valid identity id, or a reserved one (``default``, ``registry``,
            ``trust``, ``reply.*``).
    """
    check_id(identity_id)
    if identity_id in RESERVED_IDS or identity_id.startswith(_RESERVED_PREFIX):
        raise IdentityError(
            f"{identity_id!r} cannot have a Redis ACL user: 'default', 'registry', 'trust' and ids starting "
            "with 'reply.' name Redis's own user or agentcomms' shared keys"
        )
    return identity_id


def _selector(*parts: str) -> str:
    return "(" + " ".join(parts) + ")"


def _connection_rules() -> list[str]:
    """Root rules every kind has: the handshake, the probes, loading the scripts, the feed's checks."""
    return [
        "resetchannels",
        f"&{_glob(keys.EVENTS_CHANNEL)}",
        "-@all",
        "+ping",  # handshake and readiness probe
        "+select",  # handshake, when REDIS_DB is not 0
        "+client|setname",  # handshake
        "+client|id",  # handshake (for CLIENT UNBLOCK)
        "+client|unblock",  # ending a blocked read on stop
        "+role",  # the probe after a READONLY refusal (a failover)
        "+cluster|slots",  # whether the server is a Redis Cluster node, and where each slot is
        "+script|load",  # every connection loads every script
        "+time",  # the server's clock
        "+pubsub|numsub",  # the scripts publish events only while someone listens
        "+publish",  # events, on the event channel only
    ]


def _sender_selectors(identity_id: str) -> list[str]:
    """What every identity that sends needs: trust and registry reads, the send script, its own replies."""
    registry = _glob(keys.REGISTRY)
    inbox = "ac:{*}:inbox:*"
    dedup = "ac:{*}:seen"
    dead = "ac:{*}:dead"
    own_replies = f"{_glob(keys.REPLY_PREFIX)}{_glob(identity_id)}.{_HEX12}}}:replies"  # keys.replies(<id>.<hex>)
    return [
        # the trust store: read only
        _selector("+hget", "+hgetall", f"%R~{_glob(keys.TRUST_IDENTITIES)}"),
        # discovery and registry checks (registry_find, registry_stats, HEXISTS)
        _selector("+hget", "+hgetall", "+hexists", "+hkeys", "+sinter", "+zrange", "+zscore", f"%R~{registry}:*"),
        # every script, with the keys it is called with (what runs inside is checked command by command)
        _selector(
            "+evalsha",
            f"~{inbox}",
            f"~{dedup}",
            f"~{dead}",
            f"~{registry}:agents",
            f"~{registry}:idx:*",
            "~ac:{*}:record",
        ),  # fmt: skip
        # send.lua: append to an inbox (never read it)
        _selector("+xlen", "+xadd", f"%W~{inbox}"),
        # send.lua: the inbox's dedup set
        _selector("+zmscore", "+zadd", "+zremrangebyscore", "+pexpire", f"~{dedup}"),
        # its own reply streams: read, trim what was read
        _selector("+xread", "+xtrim", f"~{own_replies}"),
    ]


_INBOX_COMMANDS = (
    "+xgroup|create", "+persist", "+xreadgroup", "+xpending", "+xclaim", "+xrange", "+xrevrange", "+xack", "+xdel",
    "+xadd", "+xlen",
)  # fmt: skip
"""What an agent runs on an inbox it reads: groups, reads, claims, acknowledgements, dead-lettering."""


def _agent_selectors(identity_id: str) -> list[str]:
    """What an agent needs beyond a sender: its own inbox, replies to callers, registration."""
    registry = _glob(keys.REGISTRY)
    own = f"ac:{{{_glob(identity_id)}}}:*"
    hashes = [
        keys.REGISTRY_AGENTS,
        keys.REGISTRY_INDEXES,
        f"{keys.REGISTRY}:started",
        keys.REGISTRY_STATUS,
        keys.REGISTRY_SEEN,
        keys.REGISTRY_INSTANCE_COUNT,
    ]
    return [
        # its inbox streams, dead letters, dedup set: groups, reads, claims, acks, dead-lettering
        _selector(*_INBOX_COMMANDS, f"~{own}"),
        # role routing (security off only): the inboxes of roles, which every agent of a role reads; their dead
        # letters and records (trimmed and expired by ack.lua)
        _selector(*_INBOX_COMMANDS, "+xtrim", "+pexpire", "~ac:{@*}:*"),
        # replies to any caller (and their expiry)
        _selector("+xadd", "+pexpire", "%W~ac:{reply.*}:replies"),
        # the dead-letter index, the record's index
        _selector("+sadd", f"%W~{_glob(keys.DEAD_LETTER_INDEX)}", f"%W~{_glob(keys.RECORD_INDEX)}"),
        # ack.lua: its record (the messages it handled), trimmed by age and size, and its TTL
        _selector("+xtrim", "+pexpire", f"~ac:{{{_glob(identity_id)}}}:record"),
        # the registry scripts: shared hashes, index sets, deadlines, and its own instance set
        _selector("+hset", "+hsetnx", "+hdel", *(f"~{_glob(h)}" for h in hashes)),
        _selector("+sadd", "+srem", f"~{registry}:idx:*"),
        _selector("+zadd", "+zrem", f"~{_glob(keys.REGISTRY_DEADLINES)}"),
        _selector(
            "+zadd",
            "+zrem",
            "+zremrangebyscore",
            "+zrange",
            "+zcard",
            "+del",
            f"~{_glob(keys.registry_instances(identity_id))}",
        ),  # fmt: skip
    ]


_ADMIN_RULES = [
    "resetchannels",
    f"&{_glob(keys.EVENTS_CHANNEL)}",
    f"~{_glob(keys.PREFIX)}:*",
    "+@all",
    "-@dangerous",  # FLUSHALL, FLUSHDB, KEYS, CONFIG, DEBUG, SHUTDOWN, MODULE, MONITOR, CLIENT KILL, ACL ...
    "+info",  # health_check
    "+role",  # the probe after a READONLY refusal
    "+client|unblock",
    "+acl|setuser",  # agentcomms acl apply
    "+acl|getuser",
    "+acl|deluser",
    "+acl|list",
    "+acl|users",
    "+acl|log",  # why a command was refused
    "+acl|dryrun",
    "-script|flush",  # SCRIPT KILL and FUNCTION KILL stay: they end a runaway script (BUSY)
    "-function|flush",
    "-function|delete",
    "-function|load",
    "-function|restore",
]


def acl_rules(identity_id: str, kind: Kind | str) -> list[str]:
    """The Redis 7 ACL rules of ``identity_id`` as a process of ``kind``, without ``on`` and password.

    Each element is one ``ACL SETUSER`` argument: a root rule, or a selector ``(...)``.

    Raises:
        IdentityError: the id cannot name an ACL user (see :func:`check_acl_id`).
        ValueError: ``kind`` is not a :class:`Kind`.
    """
    kind = Kind(kind)
    check_acl_id(identity_id)
    if kind is Kind.ADMIN:
        return list(_ADMIN_RULES)
    rules = _connection_rules()
    if kind is Kind.DASHBOARD:
        rules += ["+subscribe", "+unsubscribe"]  # the event feed
    rules += _sender_selectors(identity_id)
    if kind is Kind.DASHBOARD:  # the record and the dead letters: read only
        rules += [
            _selector("+smembers", f"%R~{_glob(keys.RECORD_INDEX)}", f"%R~{_glob(keys.DEAD_LETTER_INDEX)}"),
            _selector("+xrange", "+xrevrange", "%R~ac:{*}:record"),
            _selector("+xrange", "+xrevrange", "+xlen", "%R~ac:{*}:dead"),
        ]
    if kind is Kind.AGENT:
        rules += _agent_selectors(identity_id)
    return rules


def password_hash(password: str) -> str:
    """The ``#<sha256 hex>`` form of a password, as ACL rules and files carry it."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


@dataclass(frozen=True)
class AclUser:
    """One ACL user: an identity id, its kind, and its password (never shown: ``repr`` leaves it out)."""

    name: str
    kind: Kind
    password: str = field(repr=False)

    @property
    def rules(self) -> list[str]:
        """The user's rules (see :func:`acl_rules`)."""
        return acl_rules(self.name, self.kind)

    def setuser(self) -> list[str]:
        """``ACL SETUSER <name> reset on #<hash> <rules>``: replaces whatever the user had."""
        return ["ACL", "SETUSER", self.name, "reset", "on", password_hash(self.password), *self.rules]

    def acl_line(self) -> str:
        """The user's line in an ACL file (``aclfile``): ``user <name> on #<hash> <rules>``."""
        return " ".join(["user", self.name, "on", password_hash(self.password), *self.rules])


def render_acl_file(users: Iterable[AclUser]) -> str:
    """An ACL file for ``users`` (Redis 7 ``aclfile``: one ``user`` line each, no comments allowed).

    A file without a ``default`` line leaves Redis's ``default`` user as it starts (no password,
    every command): turn it off (``ACL SETUSER default off``) or give it a password.
    """
    return "".join(user.acl_line() + "\n" for user in users)


def _quote(argument: str) -> str:
    if argument and all(c.isalnum() or c in "#@%~&+-_.:|{}*" for c in argument):
        return argument
    return '"' + argument.replace("\\", "\\\\").replace('"', '\\"') + '"'


def setuser_commands(users: Iterable[AclUser]) -> list[str]:
    """The ``ACL SETUSER`` command of each user as one line that ``redis-cli`` reads (selectors quoted)."""
    return [" ".join(_quote(argument) for argument in user.setuser()) for user in users]


def password_file(folder: str | Path, identity_id: str) -> Path:
    """Where the Redis password of ``identity_id`` is kept: ``<folder>/<id>.redis-password``."""
    return Path(folder) / f"{identity_id}{_PASSWORD_SUFFIX}"


def load_or_create_password(folder: str | Path, identity_id: str, *, create: bool = True) -> str:
    """The Redis password of ``identity_id`` from its file; a new one (written 0600) if there is none and ``create``.

    Raises:
        IdentityError: the file is readable by others, empty or unreadable; or missing and not ``create``.
    """
    path = password_file(folder, identity_id)
    try:
        info = path.stat()
    except FileNotFoundError:
        if not create:
            raise IdentityError(f"no Redis password for {identity_id!r}: {path} does not exist") from None
        return _write_password(path, secrets.token_urlsafe(32))
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(f"password file {path} is readable by others: chmod 600 it")
    try:
        password = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not password or any(c.isspace() for c in password):
        raise IdentityError(f"{path} must hold one password without spaces")
    return password


def _write_password(path: Path, password: str) -> str:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(password + "\n")
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise IdentityError(f"cannot write {path}: {exc.strerror}") from None
    logger.info("wrote a new Redis password for %s to %s", path.name.removesuffix(_PASSWORD_SUFFIX), path)
    return password


def acl_users(
    identities: Sequence[tuple[str, Kind | str]], passwords: str | Path, *, create: bool = True
) -> list[AclUser]:
    """One :class:`AclUser` per ``(id, kind)``, each with its password from ``passwords`` (made if missing).

    Raises:
        IdentityError: an id cannot be an ACL user, is given twice, or its password file is not usable.
        ValueError: a kind is not a :class:`Kind`.
    """
    users: list[AclUser] = []
    seen: set[str] = set()
    for identity_id, kind in identities:
        check_acl_id(identity_id)
        if identity_id in seen:
            raise IdentityError(f"{identity_id!r} is given twice")
        seen.add(identity_id)
        users.append(AclUser(identity_id, Kind(kind), load_or_create_password(passwords, identity_id, create=create)))
    return users
