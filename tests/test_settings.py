"""Settings from the environment and the seed's agents file."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentcomms import ConfigError, Settings, load_agents_config
from agentcomms.settings import redact_url


def test_seed_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://localhost:6379")
    monkeypatch.setenv("REDIS_PASSWORD", "s3cret")
    monkeypatch.setenv("HEARTBEAT_INTERVAL", "5")
    monkeypatch.setenv("MESSAGE_TIMEOUT", "12.5")
    monkeypatch.setenv("AGENTCOMMS_MAX_DELIVERIES", "7")
    settings = Settings()
    assert settings.redis_url == "redis://localhost:6379"
    assert settings.redis_password is not None and settings.redis_password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)
    assert (settings.heartbeat_interval, settings.message_timeout, settings.max_deliveries) == (5, 12.5, 7)


def test_bad_environment_value_is_a_clear_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESSAGE_TIMEOUT", "-1")
    monkeypatch.setenv("AGENTCOMMS_MAX_DELIVERIES", "zero")
    with pytest.raises(ConfigError) as caught:
        Settings()
    text = str(caught.value)
    assert "MESSAGE_TIMEOUT: Input should be greater than 0" in text
    assert "AGENTCOMMS_MAX_DELIVERIES: Input should be a valid integer" in text
    assert "message_timeout" not in text and "max_deliveries" not in text


@pytest.mark.parametrize("url", ["http://localhost:6379", "localhost:6379", "redis//x"])
def test_a_redis_url_that_is_not_one_is_refused(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("REDIS_URL", url)
    with pytest.raises(ConfigError, match="REDIS_URL: .* is not a Redis URL"):
        Settings()


def test_passwords_are_redacted_from_urls() -> None:
    assert redact_url("redis://:s3cret@localhost:6379/0") == "redis://:***@localhost:6379/0"
    assert redact_url("rediss://bob:s3cret@[::1]:6380") == "rediss://bob:***@[::1]:6380"
    assert redact_url("unix:///tmp/r.sock?db=1&password=s3cret") == "unix:///tmp/r.sock?db=1&password=***"
    assert redact_url("redis://localhost:6379") == "redis://localhost:6379"
    with pytest.raises(ConfigError) as caught:
        Settings(redis_url="http://:s3cret@localhost")
    assert "s3cret" not in str(caught.value)


def test_the_data_folder_is_per_user_not_per_working_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("AGENTCOMMS_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    assert Settings().data_dir == tmp_path / "xdg" / "agentcomms"
    monkeypatch.setenv("AGENTCOMMS_DATA_DIR", str(tmp_path / "mine"))
    assert Settings().data_dir == tmp_path / "mine"


def test_agents_file(tmp_path: Path) -> None:
    path = tmp_path / "agents.json"
    path.write_text(
        '{"agents": [{"agent_id": "agent.user1", "user_name": "user1", "role": "cmo",'
        ' "department": "executive", "capabilities": ["strategic_planning"], "redis_url": "redis://localhost:6379"}]}'
    )
    [agent] = load_agents_config(path).agents
    assert agent.agent_id == "agent.user1" and agent.capabilities == ["strategic_planning"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read agents config"),
        ("{not json", "not valid JSON (line 1"),
        ('{"agents": [{"agent_id": "agent.x"}]}', "agents.0.user_name: Field required"),
        ('{"agents": [], "extra": 1}', "extra: Extra inputs are not permitted"),
    ],
)
def test_bad_agents_file(tmp_path: Path, content: str | None, expected: str) -> None:
    path = tmp_path / "agents.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match="agents") as caught:
        load_agents_config(path)
    assert expected in str(caught.value) and str(path) in str(caught.value)
