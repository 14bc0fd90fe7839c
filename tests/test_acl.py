"""Redis ACL users per identity (``agentcomms acl``) on a private redis-server with ``default`` turned off.

With each process logged in as its own user and ``AGENTCOMMS_SECURITY=on``, what the
library does on its normal paths still works; then a matrix of forbidden operations, each
of which Redis must refuse with NOPERM; then what ACLs cannot prevent (so docs/security.md
says it, and this test notices if it changes).
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from agentcomms import (
    AgentInfo,
    AgentMessage,
    AgentRegistry,
    AgentResponse,
    BaseAgent,
    MessageBroker,
    MessageSender,
    PermissionDeniedError,
    RedisCommandError,
    RedisPermissionError,
    Settings,
    create_agent_config,
    keys,
)
from agentcomms.deadletters import redrive_dead_letter
from agentcomms.security import Identity, b64encode, create_admin, enrol_team
from agentcomms.security.acl import AclUser, Kind, acl_users, render_acl_file
from agentcomms.transport.scripts import REGISTRY_SET_STATUS
from conftest import wait_for_dead_letters
from faultkit import RedisServer
from test_cli import Cli

ADMIN = "admin.ops"
JANE, JOHN = "agent.cso.jane", "agent.cmo.john"
DASHBOARD, SCRIPT = "dashboard.ops", "script.report"
VICTIM = "agent.victim"
"""An agent id that is enrolled and registered but not running: the target of the 'cannot prevent' checks."""
LATER = "agent.later"
"""An agent id that is enrolled but not registered (yet)."""

TEAM: list[tuple[str, Kind, list[str]]] = [
    (JANE, Kind.AGENT, ["cso"]),
    (JOHN, Kind.AGENT, ["cmo"]),
    (VICTIM, Kind.AGENT, ["intern"]),
    (LATER, Kind.AGENT, ["intern"]),
    (DASHBOARD, Kind.DASHBOARD, ["ops"]),
    (SCRIPT, Kind.SENDER, ["reporting"]),
]

IN_SCRIPT_DENIALS = ("The user executing the script can't", "ACL failure in script")
"""How Redis refuses a command that a script runs and its caller's user may not run: an ``ERR`` reply,
not ``NOPERM`` (the first text is Redis 7.0's, the second that of later releases)."""


@dataclass
class Team:
    """The private server with ACL users, and how each identity logs in."""

    server: RedisServer
    folder: Path
    anchor: str
    users: dict[str, AclUser]

    def settings(self, identity_id: str, **extra: Any) -> Settings:
        """Security on, logged in as ``identity_id`` (user in the URL, password as REDIS_PASSWORD)."""
        return Settings(
            redis_url=f"redis://{identity_id}@127.0.0.1:{self.server.port}",
            redis_password=self.users[identity_id].password,
            security="on",
            identity_file=self.folder / f"{identity_id}.json",
            identity_dir=self.folder / "none",  # this process holds only its own identity
            trust_anchors=[self.anchor],
            claim_idle=0.3,
            message_timeout=10,
            reconnect_timeout=5,
            **extra,
        )

    def raw(self, identity_id: str) -> redis.Redis:
        """A plain redis-py client logged in as ``identity_id``."""
        user = self.users[identity_id]
        return redis.Redis(host="127.0.0.1", port=self.server.port, username=user.name, password=user.password)

    def raw_async(self, identity_id: str) -> AsyncRedis:
        user = self.users[identity_id]
        return AsyncRedis(host="127.0.0.1", port=self.server.port, username=user.name, password=user.password)


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    """A redis-server whose only users are the generated ones (``default`` is off), the team enrolled by the admin."""
    base = tmp_path_factory.mktemp("acl")
    server = RedisServer(base / "redis")
    if server.version < (7,):
        pytest.skip(f"ACL selectors need Redis 7 (this redis-server is {'.'.join(map(str, server.version))})")
    # DEBUG and MODULE are enabled, so that only the ACLs stand between a user and them
    server.start(extra=["--enable-debug-command", "yes", "--enable-module-command", "yes"])
    try:
        folder = base / "identities"
        admin = create_admin(folder, ADMIN)
        users = acl_users([(ADMIN, Kind.ADMIN), *((i, k) for i, k, _ in TEAM)], base / "passwords")
        (base / "users.acl").write_text(render_acl_file(users))
        default = server.client()
        for user in users:
            _command(default, *user.setuser())()
        _command(default, "ACL", "SETUSER", "default", "off")()  # from now on: only the users above
        default.close()
        setup = Team(server, folder, b64encode(admin.public.ed25519), {u.name: u for u in users})
        asyncio.run(_enrol(setup, admin))
        yield setup
    finally:
        server.kill()


async def _enrol(team: Team, admin: Identity) -> None:
    """The admin enrols the team (as its own Redis user) and registers the victim (not running)."""
    async with MessageBroker(settings=team.settings(ADMIN)) as broker:
        await enrol_team(broker.pipeliner, team.folder, admin, [(i, roles) for i, _, roles in TEAM])
    info = AgentInfo(agent_id=VICTIM, user_name="victim", role="intern", department="sales")
    async with MessageBroker(settings=team.settings(VICTIM)) as broker:
        registry = AgentRegistry(broker)
        await registry.register_agent(info)
        await registry.leave(VICTIM)  # registered, offline


class Jane(BaseAgent):
    """Answers requests; rejects FLAKY until ``fixed`` (a one-way message it refuses is dead-lettered)."""

    fixed = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.broadcasts: asyncio.Queue[AgentMessage] = asyncio.Queue()
        self.redriven: asyncio.Queue[AgentMessage] = asyncio.Queue()

    async def handle_request_knowledge(self, message: AgentMessage) -> dict[str, Any]:
        return {"answer": message.payload.data.get("query"), "asker_roles": message.sender_roles}

    async def handle_share_insights(self, message: AgentMessage) -> None:
        self.broadcasts.put_nowait(message)

    async def handle_flaky(self, message: AgentMessage) -> AgentResponse | None:
        if not self.fixed:
            return AgentResponse.fail("not_yet", "try again after the fix")
        self.redriven.put_nowait(message)
        return None


def agent(team: Team, identity_id: str, role: str, department: str, **kwargs: Any) -> Jane:
    config = create_agent_config(identity_id, identity_id.rsplit(".", 1)[-1], role, department)
    return Jane(config, settings=team.settings(identity_id), **kwargs)


@pytest.fixture
async def agents(team: Team) -> AsyncIterator[tuple[Jane, Jane]]:
    async with agent(team, JANE, "cso", "sales") as jane, agent(team, JOHN, "cmo", "executive") as john:
        yield jane, john


# -- what the library does on its normal paths still works -----------------------------------------


async def test_with_acls_requests_broadcast_discovery_and_the_feed_work(team: Team, agents: tuple[Jane, Jane]) -> None:
    jane, john = agents
    async with MessageSender(settings=team.settings(SCRIPT)) as script:
        reply = await script.request(JANE, "request_knowledge", {"query": "pipeline?"})
        assert reply.success and reply.data == {"answer": "pipeline?", "asker_roles": ["reporting"]}
        assert [a.agent_id for a in await script.discover_agents(role="cso", online_only=True)] == [JANE]
        assert (await script.registry.get_registry_stats()).online_agents == 2
        sent = await script.broadcast_message("share_insights", {"q4": "up"}, everyone=True)
        assert set(sent) == {JANE, JOHN, VICTIM} and all(not isinstance(r, Exception) for r in sent.values())
    for member in (jane, john):
        got = await asyncio.wait_for(member.broadcasts.get(), 10)
        assert got.sender_id == SCRIPT and got.payload.data == {"q4": "up"}

    # an agent asks an agent (and is answered on its own reply stream)
    reply = await john.request(JANE, "request_knowledge", {"query": "from john"})
    assert reply.success and reply.data == {"answer": "from john", "asker_roles": ["cmo"]}

    # the dashboard follows the feed and sees its own request go through
    async with MessageSender(settings=team.settings(DASHBOARD)) as dashboard:
        feed = dashboard.broker.events()
        assert (await anext(feed))["event"] == "subscribed"
        reply = await dashboard.request(JANE, "request_knowledge", {"query": "watched"})
        assert reply.success
        seen: set[str] = set()
        async with asyncio.timeout(10):
            while seen != {"sent", "handled"}:
                event = await anext(feed)
                if event.get("sender_id") == DASHBOARD:
                    seen.add(str(event["event"]))
        await cast(AsyncGenerator[dict[str, Any], None], feed).aclose()


async def test_with_acls_dead_letters_go_to_the_agent_and_the_admin_redrives_them(team: Team) -> None:
    async with (
        agent(team, JANE, "cso", "sales") as jane,
        MessageSender(settings=team.settings(SCRIPT)) as script,
        MessageBroker(settings=team.settings(ADMIN)) as admin,
    ):
        await script.send_message(JANE, "flaky", {"n": 1})
        admin_raw = team.raw_async(ADMIN)
        try:
            [letter] = await wait_for_dead_letters(admin_raw, JANE, 1)
        finally:
            await admin_raw.aclose()
        assert letter[b"reason"].startswith(b"rejected: not_yet")
        assert jane.running
        jane.fixed = True
        assert await admin.dead_letter_agents() == [JANE]
        [dead] = await admin.dead_letters(JANE)
        # only an admin sends it back (signed afresh): with its old token the agent would refuse a replay
        with pytest.raises(PermissionDeniedError, match="admin"):
            await script.broker.redrive_dead_letter(JANE, dead.entry_id)
        await admin.redrive_dead_letter(JANE, dead.entry_id)  # the same agent process handles it
        message = await asyncio.wait_for(jane.redriven.get(), 10)
        assert message.payload.data == {"n": 1} and message.sender_id == SCRIPT
        assert await admin.count_dead_letters(JANE) == 0


async def test_a_user_without_the_feed_gets_a_permission_error_not_endless_retries(team: Team) -> None:
    async with MessageBroker(settings=team.settings(SCRIPT)) as script:
        with pytest.raises(RedisPermissionError, match="SUBSCRIBE"):
            async for _ in script.events():
                pass


async def test_the_cli_logs_in_as_its_own_acl_user(team: Team, agents: tuple[Jane, Jane], tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    cli = Cli(home)

    def env(identity_id: str) -> dict[str, str]:
        return {
            "REDIS_USERNAME": identity_id,  # the URL names no user
            "REDIS_PASSWORD": team.users[identity_id].password,
            "AGENTCOMMS_SECURITY": "on",
            "AGENTCOMMS_IDENTITY": str(team.folder / f"{identity_id}.json"),
            "AGENTCOMMS_IDENTITY_DIR": str(tmp_path / "none"),
            "AGENTCOMMS_TRUST_ANCHORS": team.anchor,
        }

    url = f"redis://127.0.0.1:{team.server.port}"
    asked = await cli("ask", "--to", JANE, "from the cli", "--json", redis_url=url, env=env(SCRIPT))
    assert asked.code == 0, asked.err
    assert json.loads(asked.out)["data"] == {"answer": "from the cli", "asker_roles": ["reporting"]}
    listed = await cli("identity", "list", "--json", redis_url=url, env=env(SCRIPT))  # the trust store: readable
    assert listed.code == 0 and SCRIPT in {r["id"] for r in json.loads(listed.out)["identities"]}
    refused = await cli("dlq", "list", redis_url=url, env=env(SCRIPT))  # every agent's dead letters: the admin's
    assert refused.code == 2 and "NOPERM" in refused.err
    allowed = await cli("dlq", "list", redis_url=url, env=env(ADMIN))
    assert allowed.code == 0, allowed.err
    for result in (asked, listed, refused, allowed):
        assert team.users[SCRIPT].password not in result.out + result.err
        assert team.users[ADMIN].password not in result.out + result.err


# -- forbidden operations: each refused with NOPERM ------------------------------------------------

Attempt = Callable[[], Any]

PEEK = "return redis.call('XRANGE', KEYS[1], '-', '+')"
LIBRARY = "#!lua name=x\nredis.register_function('x', function() return 1 end)"


def _outcome(error: BaseException | None) -> str:
    if error is None:
        return "ALLOWED"
    if isinstance(error, RedisPermissionError | redis.exceptions.NoPermissionError):
        return "NOPERM"
    if isinstance(error, RedisCommandError | redis.exceptions.ResponseError) and any(
        text in str(error) for text in IN_SCRIPT_DENIALS
    ):
        return "NOPERM (in a script)"
    return f"{type(error).__name__}: {str(error)[:60]}"


async def _attempt(operation: Attempt) -> str:
    try:
        result = operation()
        if inspect.isawaitable(result):
            await result
    except Exception as exc:  # the outcome is the point: any error is reported as it is
        return _outcome(exc)
    return _outcome(None)


def _table(rows: list[tuple[str, str, str]], title: str) -> str:
    widths = [max(len(r[i]) for r in [("operation", "user", "result"), *rows]) for i in range(3)]
    lines = [title, " | ".join(h.ljust(w) for h, w in zip(("operation", "user", "result"), widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


async def test_forbidden_operations_are_refused_with_noperm(team: Team, agents: tuple[Jane, Jane]) -> None:
    jane, john = agents
    await john.request(JANE, "request_knowledge", {"query": "so that john's reply stream exists"})
    john_inbox, john_dead = keys.inbox(JOHN), keys.dead_letters(JOHN)
    john_replies = john.broker.reply_stream
    r = {name: team.raw(name) for name in (JANE, DASHBOARD, SCRIPT, ADMIN)}
    peek = r[JANE].script_load(PEEK)  # loading a script is allowed: what it runs is checked
    registry_record = AgentInfo(agent_id=SCRIPT, user_name="script", role="reporting", department="ops")

    async with (
        MessageSender(settings=team.settings(SCRIPT)) as script,
        MessageSender(settings=team.settings(DASHBOARD)) as dashboard,
    ):
        operations: list[tuple[str, str, Attempt]] = [
            # another agent's inbox, dead letters and reply stream
            ("XRANGE another agent's inbox", JANE, lambda: r[JANE].xrange(john_inbox)),
            ("XREADGROUP another agent's inbox", JANE, lambda: r[JANE].xreadgroup("agents", "x", {john_inbox: ">"})),
            ("XACK in another agent's inbox", JANE, lambda: r[JANE].xack(john_inbox, "agents", "1-0")),
            ("XCLAIM in another agent's inbox", JANE, lambda: r[JANE].xclaim(john_inbox, "agents", "x", 0, ["1-0"])),
            ("XAUTOCLAIM in another agent's inbox", JANE, lambda: r[JANE].xautoclaim(john_inbox, "agents", "x", 0)),
            ("XDEL in another agent's inbox", JANE, lambda: r[JANE].xdel(john_inbox, "1-0")),
            ("XTRIM another agent's inbox", JANE, lambda: r[JANE].xtrim(john_inbox, maxlen=0)),
            ("XGROUP DESTROY another agent's group", JANE, lambda: r[JANE].xgroup_destroy(john_inbox, "agents")),
            ("XSETID another agent's inbox", JANE, _command(r[JANE], "XSETID", john_inbox, "1-0")),
            ("PEXPIRE another agent's inbox", JANE, lambda: r[JANE].pexpire(john_inbox, 1)),
            ("DEL another agent's inbox", JANE, lambda: r[JANE].delete(john_inbox)),
            ("DEL another agent's dead letters", JANE, lambda: r[JANE].delete(john_dead)),
            ("list another agent's dead letters (API)", JANE, lambda: jane.broker.dead_letters(JOHN)),
            ("purge another agent's dead letters (API)", JANE, lambda: jane.broker.purge_dead_letters(JOHN)),
            ("redrive another agent's dead letter", JANE, lambda: redrive_dead_letter(jane.broker.pipeliner, JOHN, "1-0", max_inbox_length=10)),  # noqa: E501
            ("XREAD another caller's reply stream", JANE, lambda: r[JANE].xread({john_replies: "0-0"})),
            ("XREAD a caller's reply stream", SCRIPT, lambda: r[SCRIPT].xread({john_replies: "0-0"})),
            ("XRANGE an agent's inbox", SCRIPT, lambda: r[SCRIPT].xrange(john_inbox)),
            ("XREADGROUP an agent's inbox", SCRIPT, lambda: r[SCRIPT].xreadgroup("agents", "x", {john_inbox: ">"})),
            ("XRANGE an agent's inbox", DASHBOARD, lambda: r[DASHBOARD].xrange(john_inbox)),
            ("ZRANGE another agent's dedup set", JANE, lambda: r[JANE].zrange(keys.dedup(JOHN), 0, -1)),
            ("EVAL reading another agent's inbox", JANE, lambda: r[JANE].eval(PEEK, 1, john_inbox)),
            ("EVALSHA of a script reading another's inbox", JANE, lambda: r[JANE].evalsha(peek, 1, john_inbox)),
            # the trust store
            ("HSET the trust store (API)", JANE,
             lambda: jane.broker.pipeliner.call("HSET", keys.TRUST_IDENTITIES, JANE, "{}", replay=True)),
            ("HDEL from the trust store", JANE, lambda: r[JANE].hdel(keys.TRUST_IDENTITIES, JOHN)),
            ("HSET the trust store", SCRIPT, lambda: r[SCRIPT].hset(keys.TRUST_IDENTITIES, SCRIPT, "{}")),
            ("DEL the trust store", DASHBOARD, lambda: r[DASHBOARD].delete(keys.TRUST_IDENTITIES)),
            # the event feed
            ("SUBSCRIBE ac:events", JANE, _command(r[JANE], "SUBSCRIBE", keys.EVENTS_CHANNEL)),
            ("SUBSCRIBE ac:events", SCRIPT, _command(r[SCRIPT], "SUBSCRIBE", keys.EVENTS_CHANNEL)),
            ("PSUBSCRIBE ac:*", DASHBOARD, _command(r[DASHBOARD], "PSUBSCRIBE", "ac:*")),
            ("PUBLISH on another channel", JANE, lambda: r[JANE].publish("other", "x")),
            # replies: a plain sender never answers requests
            ("XADD into a caller's reply stream", SCRIPT, lambda: r[SCRIPT].xadd(john_replies, {"r": "{}"})),
            ("XADD into a caller's reply stream", DASHBOARD, lambda: r[DASHBOARD].xadd(john_replies, {"r": "{}"})),
            ("PEXPIRE a caller's reply stream", SCRIPT, lambda: r[SCRIPT].pexpire(john_replies, 1)),
            # the registry: a plain sender only reads it; an agent writes only through its own instance key
            ("register itself (API)", SCRIPT, lambda: script.registry.register_agent(registry_record)),
            ("HSET a registry record", SCRIPT, lambda: r[SCRIPT].hset(keys.REGISTRY_AGENTS, JANE, "{}")),
            ("HDEL a registry record", DASHBOARD, lambda: r[DASHBOARD].hdel(keys.REGISTRY_AGENTS, JANE)),
            ("SREM from a registry index", SCRIPT,
             lambda: r[SCRIPT].srem(keys.registry_index("role", "cso"), JANE)),
            ("set another agent's status (API)", DASHBOARD,
             lambda: AgentRegistry(dashboard.broker)._script(REGISTRY_SET_STATUS, [JANE, "busy"])),
            ("DEL another agent's registry instances", JANE,
             lambda: r[JANE].delete(keys.registry_instances(JOHN))),
            ("SADD the dead-letter index", SCRIPT, lambda: r[SCRIPT].sadd(keys.DEAD_LETTER_INDEX, "x")),
            # keys that are not agentcomms'
            ("SET a key outside ac:*", JANE, lambda: r[JANE].set("other:app", "x")),
            ("GET a key outside ac:*", SCRIPT, lambda: r[SCRIPT].get("other:app")),
            ("SET a key outside ac:*", ADMIN, lambda: r[ADMIN].set("other:app", "x")),
            # admin and dangerous commands
            *(
                (name, user, _command(r[user], *args))
                for name, users, args in [
                    ("FLUSHALL", (JANE, SCRIPT, DASHBOARD, ADMIN), ("FLUSHALL",)),
                    ("FLUSHDB", (JANE, ADMIN), ("FLUSHDB",)),
                    ("CONFIG SET", (JANE, SCRIPT, ADMIN), ("CONFIG", "SET", "maxmemory", "1")),
                    ("CONFIG GET", (JANE,), ("CONFIG", "GET", "requirepass")),
                    ("KEYS *", (JANE, SCRIPT, DASHBOARD, ADMIN), ("KEYS", "*")),
                    ("SCAN", (JANE, SCRIPT), ("SCAN", "0")),
                    ("DEBUG SLEEP", (JANE, SCRIPT, ADMIN), ("DEBUG", "SLEEP", "0")),
                    ("ACL LIST", (JANE, SCRIPT, DASHBOARD), ("ACL", "LIST")),
                    ("ACL SETUSER (escalate)", (JANE, SCRIPT), ("ACL", "SETUSER", JANE, "+@all", "~*")),
                    ("SCRIPT FLUSH", (JANE, SCRIPT, ADMIN), ("SCRIPT", "FLUSH")),
                    ("SCRIPT KILL", (JANE, SCRIPT), ("SCRIPT", "KILL")),
                    ("EVAL", (SCRIPT, DASHBOARD), ("EVAL", "return 1", "0")),
                    ("FUNCTION LOAD", (JANE, ADMIN), ("FUNCTION", "LOAD", LIBRARY)),
                    ("CLIENT KILL", (JANE, SCRIPT, ADMIN), ("CLIENT", "KILL", "ID", "1")),
                    ("CLIENT LIST", (JANE, SCRIPT), ("CLIENT", "LIST")),
                    ("INFO", (JANE, SCRIPT), ("INFO",)),
                    ("MODULE LIST", (JANE, ADMIN), ("MODULE", "LIST")),
                    ("MONITOR", (JANE,), ("MONITOR",)),
                    ("SHUTDOWN", (JANE, SCRIPT, DASHBOARD, ADMIN), ("SHUTDOWN", "NOSAVE")),
                ]
                for user in users
            ),
        ]  # fmt: skip
        rows = [(name, user, await _attempt(operation)) for name, user, operation in operations]
    for client in r.values():
        client.close()
    print("\n" + _table(rows, "ACL matrix: forbidden operations"))
    refused = [row for row in rows if row[2].startswith("NOPERM")]
    print(f"{len(refused)} of {len(rows)} refused with NOPERM ({100 * len(refused) // len(rows)}%)")
    assert [row for row in rows if not row[2].startswith("NOPERM")] == []
    assert team.server.process is not None and team.server.process.poll() is None  # still running
    assert jane.running and john.running


def _command(client: redis.Redis, *args: str) -> Attempt:
    """A raw command, to run later (redis-py's execute_command is not typed)."""
    return lambda: client.execute_command(*args)  # type: ignore[no-untyped-call]


# -- what the ACLs cannot prevent, and what least privilege breaks (docs/security.md) ---------------

LAST_ID = "18446744073709551615-18446744073709551615"


async def test_what_acls_cannot_prevent_and_what_least_privilege_breaks(team: Team) -> None:
    r = {name: team.raw(name) for name in (JANE, SCRIPT, ADMIN)}
    victim_inbox = keys.inbox(VICTIM)
    caller_replies = keys.replies(f"{SCRIPT}.0123456789ab")
    rows: list[tuple[str, str, str]] = []

    def row(operation: str, user: str, result: str) -> None:
        rows.append((operation, user, result))

    async with MessageSender(settings=team.settings(SCRIPT)) as script:
        # XADD may trim: appending to an inbox is enough to empty it
        await script.send_message(VICTIM, "share_insights", {"n": 1})
        assert r[ADMIN].xlen(victim_inbox) >= 1  # with the broadcast's, if that test ran
        r[SCRIPT].xadd(victim_inbox, {"m": "x"}, maxlen=0, approximate=False)
        assert r[ADMIN].xlen(victim_inbox) == 0
        row("XADD MAXLEN 0 into an agent's inbox (its unread messages are gone)", SCRIPT, "ALLOWED")

        # XADD may set the id: the last possible one blocks every later send; the repair needs more than a sender has
        r[SCRIPT].xadd(victim_inbox, {"m": "x"}, id=LAST_ID)
        row("XADD with the last possible entry id into an agent's inbox", SCRIPT, "ALLOWED")
        blocked = await _attempt(lambda: script.send_message(VICTIM, "share_insights", {"n": 2}))
        assert blocked == "NOPERM"
        row("send to that inbox (send.lua's repair: XRANGE, XSETID ... on it)", SCRIPT, f"refused: {blocked}")
        async with MessageSender(settings=team.settings(ADMIN)) as admin:
            await admin.send_message(VICTIM, "share_insights", {"n": 3})  # the admin's send repairs it
        assert r[ADMIN].xlen(keys.dead_letters(VICTIM)) == 1
        row("send to that inbox", ADMIN, "ALLOWED (repaired: the entry is in its dead letters)")

        # an opted-in send to an unregistered id sets a TTL on its inbox: refused after the XADD
        outcome = await _attempt(
            lambda: script.send_message(LATER, "share_insights", {"n": 4}, allow_unregistered=True)
        )
        assert outcome == "NOPERM"
        assert r[ADMIN].exists(keys.inbox(LATER)) == 0  # refused before anything was written
        row("send to an unregistered id (PEXPIRE on its inbox)", SCRIPT, f"refused: {outcome}, nothing written")

        # MessageBroker.health_check: PING says healthy; INFO (the version) is refused, so no version
        health = await script.broker.health_check()
        assert health["status"] == "healthy" and health["redis_version"] is None
        row("MessageBroker.health_check (PING, then INFO)", SCRIPT, "healthy, no version (INFO refused)")

    # keys that one pattern covers for everyone who sends or answers
    r[SCRIPT].pexpire(keys.REGISTRY_SEEN, 60_000)
    assert r[ADMIN].pttl(keys.REGISTRY_SEEN) > 0
    r[ADMIN].persist(keys.REGISTRY_SEEN)
    row("PEXPIRE ac:{registry}:seen (it matches the dedup-set pattern ac:{*}:seen)", SCRIPT, "ALLOWED")
    r[SCRIPT].zadd(keys.dedup(JOHN), {"a-future-message-id": 2**52})
    row("ZADD into another agent's dedup set", SCRIPT, "ALLOWED")
    r[JANE].xadd(caller_replies, {"r": "{}"}, maxlen=0, approximate=False)
    r[JANE].pexpire(caller_replies, 1)
    row("XADD MAXLEN 0 / PEXPIRE 1 on a caller's reply stream", JANE, "ALLOWED")
    r[JANE].hset(keys.REGISTRY_AGENTS, VICTIM, '{"agent_id": "agent.victim", "role": "cso"}')
    r[JANE].sadd(keys.registry_index("role", "cso"), VICTIM)
    row("HSET another agent's registry record, SADD it to an index (readers skip it: unsigned)", JANE, "ALLOWED")
    _command(r[JANE], "CLIENT", "UNBLOCK", "1")()
    row("CLIENT UNBLOCK of any connection", JANE, "ALLOWED")

    async with MessageSender(settings=team.settings(SCRIPT)) as script:
        assert [a.agent_id for a in await script.discover_agents(role="cso")] == [JANE]  # the forgery is not believed
    for client in r.values():
        client.close()
    print("\n" + _table(rows, "What ACLs cannot prevent, and what least privilege breaks"))
