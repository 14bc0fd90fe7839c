"""Settings from the environment and the seed's agents file."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentcomms import ConfigError, Settings, load_agents_config


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


def test_bad_environment_value_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESSAGE_TIMEOUT", "-1")
    with pytest.raises(ValueError, match="message_timeout"):
        Settings()


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
