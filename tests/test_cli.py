"""The command line, run as a user would: real subprocesses against a real redis-server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio import Redis

from agentcomms import AgentInfo, AgentRegistry, MessageBroker, Settings, keys
from agentcomms.examples import TwinAgent, create_agent_config, save_startup_config
from conftest import wait_for_dead_letters
from test_broker import message

# Variables Settings reads; the developer's own values must not leak into the commands under test.
# AGENTCOMMS_REDIS_SERVER stays: scripts/test.sh uses it to pick the redis-server binary.
_SETTINGS_VARIABLES = {name.upper() for name in Settings.model_fields}


def _is_setting(name: str) -> bool:
    upper = name.upper()
    return upper in _SETTINGS_VARIABLES or (upper.startswith("AGENTCOMMS_") and upper != "AGENTCOMMS_REDIS_SERVER")


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Cli:
    """Runs ``python -m agentcomms`` as a user would, in a temporary home: nothing touches the checkout or ~/."""

    home: Path

    def env(self, redis_url: str | None, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not _is_setting(k)}
        env.update(
            AGENTCOMMS_DATA_DIR=str(self.home / "data"),
            XDG_DATA_HOME=str(self.home / "xdg"),
            COLUMNS="200",
            PYTHONDONTWRITEBYTECODE="1",
        )
        if redis_url:
            env["REDIS_URL"] = redis_url
        env.update(extra)
        return env

    async def start(self, *args: str, redis_url: str | None) -> asyncio.subprocess.Process:
        """Start without waiting (for commands that run until stopped); stdout and stderr are pipes."""
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentcomms", *args, cwd=self.home, env=self.env(redis_url),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip

    async def __call__(
        self, *args: str, redis_url: str | None, stdin: str | None = None, env: dict[str, str] | None = None
    ) -> Result:
        """Run to the end without blocking the event loop (agents in this process keep answering)."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentcomms", *args, cwd=self.home, env={**self.env(redis_url), **(env or {})},
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            async with asyncio.timeout(300):
                out, err = await process.communicate(stdin.encode() if stdin is not None else None)
        finally:
            if process.returncode is None:  # timed out or cancelled: leave no process behind
                process.kill()
                await process.wait()
        assert process.returncode is not None
        return Result(process.returncode, out.decode(), err.decode())


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    home = tmp_path / "home"
    home.mkdir()
    return Cli(home)


@pytest.fixture
async def cso(settings: Settings) -> AsyncIterator[TwinAgent]:
    config = create_agent_config("agent.cso.jane", "jane", "cso", "sales", ["sales_forecasting"])
    async with TwinAgent(config, settings=settings) as agent:
        yield agent


async def test_demo_answers_every_scenario(cli: Cli) -> None:
    result = await cli("demo", redis_url=None)  # its own embedded Redis, in a temporary folder
    assert result.code == 0, result.err
    assert "8 of 8 scenarios answered" in result.out
    assert "forbidden: dashboard.intern" in result.out and "unauthenticated: no authentication token" in result.out
    assert "FAILED" not in result.out and "CMO asked CSO agent, got" in result.out
    assert "redis: the demo's own embedded server, in a temporary folder" in result.err
    assert "Traceback" not in result.err


async def test_agents_lists_and_filters(cli: Cli, redis_url: str, cso: TwinAgent) -> None:
    result = await cli("agents", "--role", "cso", "--json", redis_url=redis_url)
    assert result.code == 0, result.err
    [agent] = json.loads(result.out)
    assert agent["agent_id"] == "agent.cso.jane" and agent["status"] == "online"
    table = await cli("agents", "--online", redis_url=redis_url)
    assert "agent.cso.jane" in table.out and " 1 agent " in table.out


async def test_ask_by_role_and_by_id(cli: Cli, redis_url: str, cso: TwinAgent) -> None:
    by_role = await cli("ask", "--role", "cso", "Q4 pipeline?", "--json", redis_url=redis_url)
    assert by_role.code == 0, by_role.err
    reply = json.loads(by_role.out)
    assert reply["success"] and reply["data"]["pipeline"]["total"] == "$2.4M"
    by_id = await cli("ask", "--to", "agent.cso.jane", "status?", "--intent", "agent_status", redis_url=redis_url)
    assert by_id.code == 0 and "working" in by_id.out


async def test_ask_error_reply_exits_1(cli: Cli, redis_url: str, cso: TwinAgent) -> None:
    result = await cli("ask", "--to", "agent.cso.jane", "x", "--intent", "approve_budget", redis_url=redis_url)
    assert result.code == 1 and "unsupported_intent" in result.err


async def test_ask_with_nobody_online_for_the_role_exits_3(cli: Cli, redis_url: str) -> None:
    result = await cli("ask", "--role", "cfo", "budget?", redis_url=redis_url)
    assert result.code == 3
    assert "no agent with role 'cfo' is online" in result.err and "Traceback" not in result.err


async def test_ask_timeout_exits_4(cli: Cli, redis_url: str, broker: MessageBroker) -> None:
    # registered (so the request goes out) but nothing reads its inbox
    asleep = AgentInfo(agent_id="agent.asleep", user_name="asleep", role="night_shift", department="ops")
    await AgentRegistry(broker).register_agent(asleep)
    result = await cli("ask", "--to", "agent.asleep", "anyone?", "--timeout", "0.2", redis_url=redis_url)
    assert result.code == 4 and "no reply from 'agent.asleep'" in result.err


async def test_ask_an_unregistered_agent_exits_3(cli: Cli, redis_url: str) -> None:
    # the README promises 3 for "no such agent"; today the request waits for its timeout (exit 4).
    # --timeout only bounds that wait: with the registry check the CLI exits 3 before sending anything.
    result = await cli("ask", "--to", "agent.ghost", "anyone?", "--timeout", "2", redis_url=redis_url)
    assert result.code == 3, result.err
    assert "'agent.ghost' is not registered" in result.err and "Traceback" not in result.err


async def test_unreachable_redis_exits_5(cli: Cli) -> None:
    result = await cli("agents", redis_url="redis://127.0.0.1:1")
    assert result.code == 5 and "cannot reach Redis" in result.err and "Traceback" not in result.err


async def test_ask_usage_errors_exit_2(cli: Cli, redis_url: str) -> None:
    assert (await cli("ask", "hello", redis_url=redis_url)).code == 2
    bad_data = await cli("ask", "--to", "agent.x", "hi", "--data", "[1]", redis_url=redis_url)
    assert bad_data.code == 2 and "JSON object" in bad_data.err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read agents config"),
        ("{broken", "not valid JSON"),
        ('{"agents": [{"agent_id": "agent.x", "role": "cmo"}]}', "agents.0.user_name: Field required"),
    ],
)
async def test_run_agent_with_bad_config_exits_2(
    cli: Cli, redis_url: str, tmp_path: Path, content: str | None, expected: str
) -> None:
    path = tmp_path / "agents.json"
    if content is not None:
        path.write_text(content)
    result = await cli("run-agent", "--config", str(path), redis_url=redis_url)
    assert result.code == 2 and expected in result.err and "Traceback" not in result.err


async def test_run_agent_with_unknown_agent_or_class_exits_2(cli: Cli, redis_url: str, tmp_path: Path) -> None:
    path = save_startup_config(tmp_path / "team.json")
    unknown = await cli("run-agent", "--config", str(path), "--agent-id", "agent.nobody", redis_url=redis_url)
    assert unknown.code == 2 and "no agent agent.nobody in the file" in unknown.err
    bad_class = await cli("run-agent", "--config", str(path), "--class", "json:loads", redis_url=redis_url)
    assert bad_class.code == 2 and "is not a BaseAgent subclass" in bad_class.err


async def test_run_agent_serves_until_sigterm(cli: Cli, redis_url: str, tmp_path: Path, broker: MessageBroker) -> None:
    # REDIS_URL wins over the file's redis_url (a closed port here)
    raj = create_agent_config("agent.cto.raj", "raj", "cto", "engineering", redis_url="redis://127.0.0.1:1/0")
    path = save_startup_config(tmp_path / "team.json", [raj])
    process = await cli.start(
        "run-agent", "--config", str(path), "--class", "agentcomms.examples:TwinAgent", redis_url=redis_url
    )
    assert process.stdout is not None
    async with asyncio.timeout(60):
        assert (await process.stdout.readline()).decode().strip() == "READY agent.cto.raj"
    reply = await broker.request(message("agent.cto.raj").model_copy(update={"intent": "get_roadmap"}))
    assert reply.success and "Q4: SSO and audit log" in reply.data["roadmap"]
    process.terminate()
    async with asyncio.timeout(60):
        _, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    assert err.decode().splitlines()[0] == f"redis: {redis_url} (REDIS_URL)"


async def _read_until(stream: asyncio.StreamReader | None, text: str) -> list[str]:
    """Lines of ``stream`` up to and including the first one containing ``text``."""
    assert stream is not None
    lines: list[str] = []
    while not lines or text not in lines[-1]:
        line = await stream.readline()
        assert line, f"stream ended before {text!r}; got {lines}"
        lines.append(line.decode())
    return lines


async def test_tail_prints_live_events(cli: Cli, redis_url: str, broker: MessageBroker, cso: TwinAgent) -> None:
    process = await cli.start("tail", "--count", "2", "--agent", "agent.cso.jane", redis_url=redis_url)
    async with asyncio.timeout(60):
        await _read_until(process.stderr, "subscribed")  # the feed is listening
        await broker.request(message("agent.cso.jane"))
        out, _ = await process.communicate()
    lines = out.decode().splitlines()
    assert process.returncode == 0 and len(lines) == 2
    assert "sent" in lines[0] and "handled" in lines[1] and "agent.cso.jane" in lines[0]


async def _dead_letter_garbage(broker: MessageBroker, raw: Redis, agent: str) -> None:
    """Give ``agent`` one dead letter: an inbox entry that is not a message."""
    await broker.publish_message(message(agent, n=1))
    await raw.xadd(keys.inbox(agent), {"garbage": "1"})

    async def nothing(_: object) -> None:
        return None

    subscription = await broker.subscribe_to_agent(agent, nothing)
    letters = await wait_for_dead_letters(raw, agent, 1)
    await subscription.stop()
    assert letters[0][b"reason"].startswith(b"malformed")


async def test_dlq_list_show_redrive_purge(cli: Cli, redis_url: str, broker: MessageBroker, raw: Redis) -> None:
    agent = "agent.dlq.cli"
    await _dead_letter_garbage(broker, raw, agent)
    listing = await cli("dlq", "list", redis_url=redis_url)
    assert listing.code == 0 and agent in listing.out
    [letter] = await broker.dead_letters(agent)
    shown = await cli("dlq", "show", agent, letter.entry_id, redis_url=redis_url)
    assert shown.code == 0 and json.loads(shown.out)["raw"] == '["garbage","1"]'
    redrive = await cli("dlq", "redrive", agent, "--all", redis_url=redis_url)
    assert redrive.code == 0 and "redriven: 0" in redrive.out and "not a valid message" in redrive.err
    assert (await cli("dlq", "purge", agent, redis_url=redis_url, stdin="n\n")).code == 1
    purged = await cli("dlq", "purge", agent, "--yes", redis_url=redis_url)
    assert purged.code == 0 and "purged: 1" in purged.out
    assert await broker.dead_letters(agent) == []


async def test_schema_prints_json(cli: Cli) -> None:
    result = await cli("schema", redis_url=None)
    assert result.code == 0 and "AgentMessage" in json.loads(result.out)


@pytest.mark.parametrize("role", ["^*$", "[bold]cfo[/]", "[/]", ":smile:"])
async def test_a_role_with_markup_is_printed_as_typed(cli: Cli, redis_url: str, role: str) -> None:
    result = await cli("ask", "--role", role, "budget?", redis_url=redis_url)
    assert result.code == 3, result.err
    assert f"no agent with role '{role}' is online" in result.err and "Traceback" not in result.err


async def test_an_agent_id_with_markup_is_printed_as_typed(cli: Cli, redis_url: str) -> None:
    result = await cli("ask", "--to", "agent.[red]cso", "hi", redis_url=redis_url)
    assert result.code == 2 and "'agent.[red]cso'" in result.err, result.err


async def test_registered_names_with_markup_are_listed_as_stored(
    cli: Cli, redis_url: str, broker: MessageBroker
) -> None:
    odd = AgentInfo(agent_id="agent.odd", user_name="odd", role="[bold]ops", department="[/]", capabilities=[":x:"])
    await AgentRegistry(broker).register_agent(odd)
    result = await cli("agents", redis_url=redis_url)
    assert result.code == 0, result.err
    assert "[bold]ops" in result.out and "[/]" in result.out and ":x:" in result.out


async def test_ask_takes_data_inline_from_a_file_or_from_stdin(cli: Cli, redis_url: str, cso: TwinAgent) -> None:
    (cli.home / "task.json").write_text('{"task_id": "T-file"}')
    ask = ("ask", "--to", "agent.cso.jane", "take this", "--intent", "assign_task", "--json")
    inline = await cli(*ask, "--data", '{"task_id": "T-inline"}', redis_url=redis_url)
    from_file = await cli(*ask, "--data", "@task.json", redis_url=redis_url)
    from_stdin = await cli(*ask, "--data", "-", redis_url=redis_url, stdin='{"task_id": "T-stdin"}')
    for result, task in ((inline, "T-inline"), (from_file, "T-file"), (from_stdin, "T-stdin")):
        assert result.code == 0, result.err
        assert json.loads(result.out)["data"]["task_id"] == task


@pytest.mark.parametrize(
    ("data", "stdin", "expected"),
    [
        ("@missing.json", None, "cannot read missing.json: No such file or directory"),
        ("@.", None, "cannot read .: Is a directory"),
        ("@broken.json", None, "broken.json is not JSON (line 1, column 2)"),
        ("@list.json", None, "list.json must hold a JSON object, not a list"),
        ("@binary.json", None, "cannot read binary.json: not UTF-8 text"),
        ("-", "{", "stdin is not JSON (line 1, column 2)"),
        ("-", '"text"', "stdin must hold a JSON object, not a string"),
        ("{", None, "not JSON (line 1, column 2)"),
        ("[1]", None, "must be a JSON object, not a list"),
    ],
)
async def test_ask_with_unusable_data_exits_2(
    cli: Cli, redis_url: str, data: str, stdin: str | None, expected: str
) -> None:
    (cli.home / "broken.json").write_text("{")
    (cli.home / "list.json").write_text("[1, 2]")
    (cli.home / "binary.json").write_bytes(b"\xff\xfe{")
    result = await cli("ask", "--to", "agent.x", "hi", "--data", data, redis_url=redis_url, stdin=stdin)
    assert result.code == 2 and "Invalid value for '--data'" in result.err and expected in result.err, result.err
    assert "Traceback" not in result.err


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"REDIS_URL": "http://127.0.0.1:6379/0"}, "REDIS_URL: 'http://127.0.0.1:6379/0' is not a Redis URL"),
        ({"REDIS_DB": "99"}, "REDIS_DB: Input should be less than or equal to 15"),
        ({"MESSAGE_TIMEOUT": "soon"}, "MESSAGE_TIMEOUT: Input should be a valid number"),
        ({"AGENTCOMMS_MAX_DELIVERIES": "0"}, "AGENTCOMMS_MAX_DELIVERIES: Input should be greater than or equal to 1"),
        ({"REDIS_URL": "redis://127.0.0.1:notaport/0"}, "'redis://127.0.0.1:notaport/0': Port could not be cast"),
    ],
)
async def test_bad_settings_exit_2_with_one_line_naming_the_variable(
    cli: Cli, env: dict[str, str], expected: str
) -> None:
    result = await cli("agents", redis_url=None, env=env)
    assert result.code == 2 and expected in result.err, result.err
    assert result.err.startswith("error: ") and result.err.count("\n") == 1, result.err


async def test_a_config_files_redis_url_that_is_not_redis_exits_2(cli: Cli, tmp_path: Path) -> None:
    path = save_startup_config(tmp_path / "team.json")
    config = json.loads(path.read_text())
    config["agents"][0]["redis_url"] = "http://127.0.0.1:6379/0"
    path.write_text(json.dumps(config))
    agent_id = config["agents"][0]["agent_id"]
    result = await cli("run-agent", "--config", str(path), "--agent-id", agent_id, redis_url=None)
    assert result.code == 2 and "'http://127.0.0.1:6379/0'" in result.err and "Traceback" not in result.err


async def test_log_level_goes_before_or_after_the_command_or_comes_from_log_level(cli: Cli, redis_url: str) -> None:
    # the broker logs its connection at INFO; the CLI's own default is WARNING
    quiet = await cli("agents", redis_url=redis_url)
    assert quiet.code == 0 and "connected to" not in quiet.err, quiet.err
    for args, env in [
        (("--log-level", "info", "agents"), {}),
        (("agents", "--log-level", "INFO"), {}),
        (("agents",), {"LOG_LEVEL": "info"}),
        (("dlq", "list", "--log-level", "Info"), {}),
        (("--log-level", "DEBUG", "dlq", "list"), {}),
    ]:
        result = await cli(*args, redis_url=redis_url, env=env)
        assert result.code == 0 and "connected to" in result.err, (args, env, result.err)
    overridden = await cli("agents", "--log-level", "warning", redis_url=redis_url, env={"LOG_LEVEL": "DEBUG"})
    assert overridden.code == 0 and "connected to" not in overridden.err, overridden.err


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (("--log-level", "verbose", "agents"), {}, "Invalid value for '--log-level'"),
        (("agents", "--log-level", "verbose"), {}, "Invalid value for '--log-level'"),
        (("agents",), {"LOG_LEVEL": "verbose"}, "LOG_LEVEL"),
    ],
)
async def test_an_unknown_log_level_exits_2(
    cli: Cli, redis_url: str, args: tuple[str, ...], env: dict[str, str], expected: str
) -> None:
    result = await cli(*args, redis_url=redis_url, env=env)
    assert result.code == 2 and expected in result.err and "verbose" in result.err, result.err
    assert "Traceback" not in result.err


async def test_dlq_show_or_redrive_of_a_missing_entry_says_there_is_no_such_dead_letter(
    cli: Cli, redis_url: str, cso: TwinAgent
) -> None:
    for command in ("show", "redrive"):
        result = await cli("dlq", command, "agent.cso.jane", "1-0", redis_url=redis_url)
        assert result.code == 3, result.err
        assert "no dead letter 1-0 for 'agent.cso.jane'" in result.err and "not registered" not in result.err


async def test_dlq_list_of_an_unknown_agent_exits_3_and_of_an_agent_without_dead_letters_0(
    cli: Cli, redis_url: str, cso: TwinAgent
) -> None:
    unknown = await cli("dlq", "list", "agent.nobody", redis_url=redis_url)
    assert unknown.code == 3, unknown.out
    assert "agent 'agent.nobody' is not registered and has no dead letters" in unknown.err
    clean = await cli("dlq", "list", "agent.cso.jane", redis_url=redis_url)
    assert clean.code == 0 and "dead letters of agent.cso.jane" in clean.out, clean.err


@pytest.mark.parametrize(
    "args",
    [
        ("tail", "--agent", "bad id {}", "--count", "1"),
        ("ask", "--to", "bad id {}", "hi"),
        ("dlq", "list", "bad id {}"),
        ("dlq", "show", "bad id {}", "1-0"),
        ("dlq", "redrive", "bad id {}", "--all"),
        ("dlq", "purge", "bad id {}", "--yes"),
    ],
)
async def test_an_invalid_agent_id_exits_2(cli: Cli, redis_url: str, args: tuple[str, ...]) -> None:
    result = await cli(*args, redis_url=redis_url)
    assert result.code == 2 and "'bad id {}' is not an agent id" in result.err, result.err


@pytest.mark.parametrize("command", ["show", "redrive"])
async def test_an_invalid_entry_id_exits_2(cli: Cli, redis_url: str, command: str) -> None:
    result = await cli("dlq", command, "agent.cso.jane", "latest", redis_url=redis_url)
    assert result.code == 2 and "'latest' is not a dead-letter entry id" in result.err, result.err


async def test_counts_are_singular_or_plural(
    cli: Cli, redis_url: str, broker: MessageBroker, raw: Redis, cso: TwinAgent
) -> None:
    one = await cli("agents", redis_url=redis_url)
    assert one.code == 0 and " 1 agent " in one.out and "1 agents" not in one.out, one.out
    await AgentRegistry(broker).register_agent(
        AgentInfo(agent_id="agent.cfo.li", user_name="li", role="cfo", department="finance")
    )
    assert " 2 agents " in (await cli("agents", redis_url=redis_url)).out

    agent = "agent.dlq.count"
    await _dead_letter_garbage(broker, raw, agent)
    by_agent = await cli("dlq", "list", redis_url=redis_url)
    assert " 1 agent with dead letters " in by_agent.out, by_agent.out
    letters = await cli("dlq", "list", agent, redis_url=redis_url)
    assert f" 1 dead letter of {agent} " in letters.out, letters.out
    none = await cli("dlq", "list", "agent.cso.jane", redis_url=redis_url)
    assert " 0 dead letters of agent.cso.jane " in none.out, none.out
    redriven = await cli("dlq", "redrive", agent, "--all", redis_url=redis_url)
    assert "redriven: 0 dead letters" in redriven.out, redriven.out
    purged = await cli("dlq", "purge", agent, "--yes", redis_url=redis_url)
    assert "purged: 1 dead letter\n" in purged.out, purged.out


async def test_the_redis_password_appears_in_no_output_or_log_line(cli: Cli, tmp_path: Path) -> None:
    url = "redis://:hunter2@127.0.0.1:1/0"  # a closed loopback port: every command fails to connect
    team = save_startup_config(tmp_path / "team.json")
    from_file = tmp_path / "from_file.json"
    config = json.loads(team.read_text())
    config["agents"][0]["redis_url"] = url
    from_file.write_text(json.dumps(config))
    first_agent = config["agents"][0]["agent_id"]
    commands: list[tuple[tuple[str, ...], str | None]] = [
        (("agents", "--json"), url),
        (("ask", "--to", "agent.x", "hi"), url),
        (("ask", "--role", "cso", "hi"), url),
        (("tail",), url),
        (("dlq", "list"), url),
        (("dlq", "show", "agent.x", "1-0"), url),
        (("run-agent", "--config", str(team), "--agent-id", first_agent), url),
        (("run-agent", "--config", str(from_file), "--agent-id", first_agent), None),  # the URL from the file
        (("demo",), url),
    ]
    for args, redis_url in commands:
        result = await cli("--log-level", "DEBUG", *args, redis_url=redis_url)
        assert result.code == 5, (args, result.err)
        assert "hunter2" not in result.out + result.err, (args, result.out, result.err)
        assert "redis://127.0.0.1:1/0" in result.err, (args, result.err)  # where, without credentials


async def test_commands_say_on_stderr_which_redis_they_use(cli: Cli, redis_url: str, tmp_path: Path) -> None:
    from_env = await cli("agents", "--json", redis_url=redis_url)
    assert from_env.code == 0 and json.loads(from_env.out) == []  # stdout stays JSON
    assert f"redis: {redis_url} (REDIS_URL)" in from_env.err.splitlines(), from_env.err

    raj = create_agent_config("agent.cto.raj", "raj", "cto", "tech", redis_url=redis_url)
    team = save_startup_config(tmp_path / "team.json", [raj])
    process = await cli.start("run-agent", "--config", str(team), redis_url=None)
    async with asyncio.timeout(60):
        [line] = await _read_until(process.stderr, "redis: ")  # without REDIS_URL, the file's redis_url
        assert process.stdout is not None and await process.stdout.readline() == b"READY agent.cto.raj\n"
        process.terminate()
        await process.communicate()
    assert line.strip() == f"redis: {redis_url} (redis_url in {team})" and process.returncode == 0

    # no REDIS_URL: the embedded server of AGENTCOMMS_DATA_DIR, started for the command and stopped after it
    embedded = await cli("agents", redis_url=None, env={"HOME": str(cli.home)})
    assert embedded.code == 0, embedded.err
    [line] = [line for line in embedded.err.splitlines() if line.startswith("redis: ")]
    assert line.startswith(f"redis: unix://{cli.home / 'data'}/") and line.endswith("(embedded, data in ~/data)")


async def test_the_embedded_server_is_found_from_any_folder_and_stopped_on_request(cli: Cli) -> None:
    # an agent on the embedded server of the data folder; commands from another folder see it
    config = save_startup_config(cli.home / "team.json", [create_agent_config("agent.cto.raj", "raj", "cto", "tech")])
    process = await cli.start("run-agent", "--config", str(config), redis_url=None)
    try:
        assert process.stdout is not None
        async with asyncio.timeout(60):
            assert await process.stdout.readline() == b"READY agent.cto.raj\n"
        status = await cli("redis", "status", "--json", redis_url=None)
        info = json.loads(status.out)
        assert status.code == 0 and info["source"] == "embedded" and info["running"] is True
        elsewhere = cli.home / "elsewhere"
        elsewhere.mkdir()
        found = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentcomms", "agents", "--json", cwd=elsewhere, env=cli.env(None),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await found.communicate()
        assert found.returncode == 0, err
        assert [a["agent_id"] for a in json.loads(out)] == ["agent.cto.raj"]  # the same server, not a new empty one
        assert f"redis: {info['url']}" in err.decode()
        stopped = await cli("redis", "stop", redis_url=None)
        assert stopped.code == 0 and "stopped the embedded redis-server" in stopped.out
        after = json.loads((await cli("redis", "status", "--json", redis_url=None)).out)
        assert after["running"] is False
    finally:
        process.kill()  # its Redis is gone: a clean stop could not leave the registry anyway
        await process.wait()
