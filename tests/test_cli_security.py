"""``agentcomms identity`` and ``agentcomms acl`` as a user runs them: subprocesses, temporary folders, real Redis."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from agentcomms import MessageBroker, Settings
from agentcomms.security import Identity, b64encode, create_admin, enrol_team
from agentcomms.security.acl import AclUser, Kind, acl_rules, check_acl_id, password_file, password_hash
from agentcomms.transport import ConnectionSpec
from faultkit import RedisServer
from test_cli import Cli

ADMIN, JANE, JOHN = "admin.ops", "agent.cso.jane", "agent.cmo.john"


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    home = tmp_path / "home"
    home.mkdir()
    return Cli(home)


def private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) == 0o600


# -- agentcomms identity ---------------------------------------------------------------------------


async def test_identity_create_trust_list_revoke(cli: Cli, redis_url: str, tmp_path: Path) -> None:
    ids = tmp_path / "ids"
    env = {"AGENTCOMMS_IDENTITY_DIR": str(ids)}

    created = await cli("identity", "create", ADMIN, "--admin", redis_url=None, env=env)
    assert created.code == 0, created.err
    token_line, anchor_line = created.out.splitlines()
    admin_key = json.loads(token_line)["ed25519"]
    assert anchor_line == f"AGENTCOMMS_TRUST_ANCHORS={admin_key}"
    assert (ids / "trust_anchors").read_text().split() == [admin_key]
    assert private(ids / f"{ADMIN}.json")

    jane = await cli("identity", "create", JANE, redis_url=None, env=env)
    assert jane.code == 0 and private(ids / f"{JANE}.json")
    assert json.loads(jane.out) == Identity.load(ids / f"{JANE}.json").public.as_json()
    # a token from elsewhere: created in another folder, handed over as text
    john = await cli("identity", "create", JOHN, "--dir", str(tmp_path / "johns"), redis_url=None, env=env)
    assert john.code == 0 and (tmp_path / "johns" / f"{JOHN}.json").exists()
    private_keys = [
        json.loads((folder / f"{i}.json").read_text())[kind]
        for folder, i in ((ids, ADMIN), (ids, JANE), (tmp_path / "johns", JOHN))
        for kind in ("ed25519", "x25519")
    ]

    as_admin = {**env, "AGENTCOMMS_IDENTITY": str(ids / f"{ADMIN}.json")}
    results = [
        await cli("identity", "trust", "--id", ADMIN, "--admin", redis_url=redis_url, env=as_admin),
        await cli("identity", "trust", "--id", JANE, "--role", "cso", "--role", "sales", redis_url=redis_url,
                  env=as_admin),
        await cli("identity", "trust", john.out.strip(), "--role", "cmo", redis_url=redis_url, env=as_admin),
    ]  # fmt: skip
    for result in results:
        assert result.code == 0, result.err
    assert "enrolled agent.cso.jane (cso, sales)" in results[1].out

    listed = await cli("identity", "list", "--json", redis_url=redis_url, env=env)
    assert listed.code == 0, listed.err
    records = {r["id"]: r for r in json.loads(listed.out)["identities"]}
    assert set(records) == {ADMIN, JANE, JOHN} and json.loads(listed.out)["invalid"] == []
    assert records[JANE]["roles"] == ["cso", "sales"] and not records[JANE]["admin"] and records[ADMIN]["admin"]
    assert records[JANE]["fingerprint"] == Identity.load(ids / f"{JANE}.json").public.fingerprint
    table = await cli("identity", "list", redis_url=redis_url, env=env)
    assert "3 identities in the trust store" in table.out and "cso, sales" in table.out

    shown = await cli("identity", "show", JANE, redis_url=None, env=env)
    assert shown.out == jane.out and Identity.load(ids / f"{JANE}.json").public.fingerprint in shown.err

    revoked = await cli("identity", "revoke", JANE, redis_url=redis_url, env=as_admin)
    assert revoked.code == 0 and "ACL DELUSER agent.cso.jane" in revoked.err
    listed = await cli("identity", "list", "--json", redis_url=redis_url, env=env)
    assert {r["id"] for r in json.loads(listed.out)["identities"]} == {ADMIN, JOHN}
    again = await cli("identity", "revoke", JANE, redis_url=redis_url, env=as_admin)
    assert again.code == 3 and "not in the trust store" in again.err

    outputs = "".join(r.out + r.err for r in (created, jane, john, *results, listed, table, shown, revoked, again))
    assert not any(key in outputs for key in private_keys)  # private keys never printed


async def test_identity_trust_needs_an_admin(cli: Cli, redis_url: str, tmp_path: Path) -> None:
    ids = tmp_path / "ids"
    env = {"AGENTCOMMS_IDENTITY_DIR": str(ids)}
    assert (await cli("identity", "create", ADMIN, "--admin", redis_url=None, env=env)).code == 0
    assert (await cli("identity", "create", JANE, redis_url=None, env=env)).code == 0

    nobody = await cli("identity", "trust", "--id", JANE, "--role", "cso", redis_url=redis_url, env=env)
    assert nobody.code == 2 and "the trust store is written by an admin" in nobody.err, nobody.err
    not_admin = await cli(
        "identity", "trust", "--id", JANE, "--role", "cso", "--as", str(ids / f"{JANE}.json"),
        redis_url=redis_url, env=env,
    )  # fmt: skip
    assert not_admin.code == 2 and "'agent.cso.jane' is not an admin" in not_admin.err
    pasted = await cli(
        "identity", "trust", (ids / f"{JANE}.json").read_text(), "--as", str(ids / f"{ADMIN}.json"),
        redis_url=redis_url, env=env,
    )  # fmt: skip
    assert pasted.code == 2 and "private identity file" in pasted.err
    assert json.loads((ids / f"{JANE}.json").read_text())["ed25519"] not in pasted.err
    exists = await cli("identity", "create", JANE, redis_url=None, env=env)
    assert exists.code == 2 and "exists" in exists.err
    for result in (nobody, not_admin, pasted, exists):
        assert len(result.err.strip().splitlines()[-1]) > 0 and "Traceback" not in result.err


async def test_ask_with_security_on_asks_as_the_identity_it_holds(cli: Cli, redis_url: str, tmp_path: Path) -> None:
    ids = tmp_path / "ids"
    env = {"AGENTCOMMS_IDENTITY_DIR": str(ids), "AGENTCOMMS_SECURITY": "on"}
    assert (await cli("identity", "create", ADMIN, "--admin", redis_url=None, env=env)).code == 0
    assert (await cli("identity", "create", JANE, redis_url=None, env=env)).code == 0
    nobody = await cli("ask", "pipeline?", "--to", JANE, redis_url=redis_url, env=env)  # two identities: which?
    assert nobody.code == 2 and "set AGENTCOMMS_IDENTITY to the identity file to speak as" in nobody.err, nobody.err
    assert "Traceback" not in nobody.err


async def test_identity_create_force_replaces_the_admin_anchor(cli: Cli, tmp_path: Path) -> None:
    ids = tmp_path / "ids"
    env = {"AGENTCOMMS_IDENTITY_DIR": str(ids)}
    first = await cli("identity", "create", ADMIN, "--admin", redis_url=None, env=env)
    second = await cli("identity", "create", ADMIN, "--admin", "--force", redis_url=None, env=env)
    assert second.code == 0, second.err
    assert (ids / "trust_anchors").read_text().split() == [json.loads(second.out.splitlines()[0])["ed25519"]]
    assert first.out.splitlines()[0] != second.out.splitlines()[0]


# -- agentcomms acl --------------------------------------------------------------------------------


def test_acl_rules_by_kind() -> None:
    sender, agent, dashboard = (acl_rules(JANE, kind) for kind in (Kind.SENDER, Kind.AGENT, Kind.DASHBOARD))
    assert "-@all" in sender and "+subscribe" not in sender and "+subscribe" in dashboard
    assert not any("reply.*" in rule for rule in sender + dashboard)  # a plain sender never answers
    assert not any("{agent.cso.jane}" in rule for rule in sender)  # and has no inbox
    assert "(+xadd +pexpire %W~ac:{reply.*}:replies)" in agent
    assert any(rule.startswith("(+xgroup|create") and rule.endswith("~ac:{agent.cso.jane}:*)") for rule in agent)
    assert set(sender) < set(agent) and set(sender) < set(dashboard)
    admin = acl_rules(ADMIN, Kind.ADMIN)
    assert admin.index("+@all") < admin.index("-@dangerous") and "~ac:*" in admin
    for reserved in ("default", "registry", "trust", "reply.x"):
        with pytest.raises(ValueError, match="cannot have a Redis ACL user"):
            check_acl_id(reserved)


def test_an_acl_user_never_shows_its_password() -> None:
    user = AclUser(JANE, Kind.AGENT, "s3cret-password-value")
    assert "s3cret" not in repr(user) and "s3cret" not in user.acl_line() and "s3cret" not in " ".join(user.setuser())
    assert password_hash("s3cret-password-value") in user.acl_line()


def test_redis_username_applies_when_the_url_names_no_user() -> None:
    spec = ConnectionSpec.from_url("redis://127.0.0.1:6379", username=JANE, password="pw")
    assert (spec.username, spec.password) == (JANE, "pw")
    assert ConnectionSpec.from_url("redis://other@127.0.0.1", username=JANE).username == "other"
    assert Settings(redis_username=JANE).redis_username == JANE and Settings(redis_username="").redis_username is None
    assert ConnectionSpec.from_url("redis://:pw@127.0.0.1", username="a@b").username == "a@b"
    assert ConnectionSpec.from_url("unix:///tmp/r.sock", username=JANE).username == JANE


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[RedisServer]]:
    """Two private redis-servers (they are told apart by how their users were made)."""
    started: list[RedisServer] = []
    try:
        for name in ("from-file", "applied"):
            server = RedisServer(tmp_path / name)
            if server.version < (7,):
                pytest.skip("ACL selectors need Redis 7")
            started.append(server)
        yield started
    finally:
        for server in started:
            server.kill()


def acl_list(server: RedisServer, password: str | None = None, user: str | None = None) -> list[list[list[str]]]:
    """The users as Redis lists them (but ``default``): per user its root rules and each selector, as sorted tokens.

    Redis lists commands in no fixed order, and ``reset`` (ACL SETUSER) adds ``sanitize-payload``.
    """
    client = redis.Redis(host="127.0.0.1", port=server.port, username=user, password=password)
    try:
        listed = [line.decode() if isinstance(line, bytes) else str(line) for line in client.acl_list()]
        lines = sorted(line for line in listed if not line.startswith("user default "))
    finally:
        client.close()
    users = []
    for line in lines:
        root, *selectors = line.replace(" sanitize-payload", "").split(" (")
        users.append([sorted(part.strip(" ()").split()) for part in (root, *selectors)])
    return users


async def test_acl_generate_file_and_apply_make_the_same_users(
    cli: Cli, tmp_path: Path, servers: list[RedisServer]
) -> None:
    passwords = tmp_path / "passwords"
    identities = ["-i", f"{JANE}:agent", "-i", "dashboard.ops:dashboard", "-i", "script.report:sender"]
    identities += ["-i", f"{ADMIN}:admin"]
    acl_file = tmp_path / "users.acl"
    generated = await cli(
        "acl", "generate", *identities, "--passwords", str(passwords), "--out", str(acl_file), redis_url=None
    )
    assert generated.code == 0, generated.err
    assert private(acl_file) and all(private(p) for p in passwords.iterdir()) and len(list(passwords.iterdir())) == 4
    secrets = {p.name: p.read_text().strip() for p in passwords.iterdir()}
    admin_password = secrets[password_file(passwords, ADMIN).name]

    from_file, applied = servers
    from_file.start(extra=["--aclfile", str(acl_file)])
    applied.start()
    result = await cli("acl", "apply", *identities, "--passwords", str(passwords), "--disable-default",
                       redis_url=applied.url)  # fmt: skip
    assert result.code == 0, result.err
    assert "applied 4 ACL users" in result.out and "'default' user is off" in result.out

    # the same users either way: the file's lines and ACL SETUSER's, as Redis lists them
    assert acl_list(from_file) == acl_list(applied, admin_password, ADMIN)
    assert len(acl_list(from_file)) == 4
    with pytest.raises(redis.AuthenticationError):
        applied.client().ping()  # default is off
    jane = redis.Redis(host="127.0.0.1", port=applied.port, username=JANE, password=secrets[f"{JANE}.redis-password"])
    assert jane.ping()  # logged in as its own user
    jane.close()

    # generated again: the same passwords (from their files), the same file
    again = await cli("acl", "generate", *identities, "--passwords", str(passwords), redis_url=None)
    assert again.out == acl_file.read_text()
    commands = await cli("acl", "generate", *identities, "--passwords", str(passwords), "--commands", redis_url=None)
    assert commands.out.count("ACL SETUSER ") == 4 and '"(+xadd +pexpire %W~ac:{reply.*}:replies)"' in commands.out
    everything = "".join(r.out + r.err for r in (generated, result, again, commands)) + acl_file.read_text()
    assert not any(secret in everything for secret in secrets.values())


async def test_acl_generate_from_the_trust_store(cli: Cli, redis_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "ids"
    admin = create_admin(folder, ADMIN)
    async with MessageBroker(settings=Settings(redis_url=redis_url)) as broker:
        await enrol_team(broker.pipeliner, folder, admin, [(JANE, ["cso"]), ("dashboard.ops", ["ops"])])
    env = {"AGENTCOMMS_IDENTITY_DIR": str(folder), "AGENTCOMMS_TRUST_ANCHORS": b64encode(admin.public.ed25519)}
    result = await cli("acl", "generate", "--from-trust-store", "-i", "dashboard.ops:dashboard", redis_url=redis_url,
                       env=env)  # fmt: skip
    assert result.code == 0, result.err
    users = {line.split()[1]: line for line in result.out.splitlines() if line.startswith("user ")}
    assert set(users) == {ADMIN, JANE, "dashboard.ops"}
    assert "~ac:* +@all -@dangerous" in users[ADMIN]  # an admin record: the admin user
    assert "{agent.cso.jane}" in users[JANE]  # the default kind: agent
    assert "+subscribe" in users["dashboard.ops"] and "reply.*" not in users["dashboard.ops"]
    assert all(private(password_file(folder, i)) for i in users)

    reserved = await cli("acl", "generate", "-i", "registry:agent", redis_url=None, env=env)
    assert reserved.code == 2 and "'registry' cannot have a Redis ACL user" in reserved.err
    nothing = await cli("acl", "generate", redis_url=None, env=env)
    assert nothing.code == 2 and "--identity ID:KIND" in nothing.err
