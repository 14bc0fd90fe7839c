"""A pytest plugin to test your own agents against a real Redis, in a few lines.

Enable it in your ``conftest.py`` (it needs pytest and pytest-asyncio: ``pip install 'agentcomms[testing]'``)::

    pytest_plugins = ["agentcomms.testing"]

and write tests such as::

    async def test_my_twin_answers(agentcomms_agent, agentcomms_sender):
        await agentcomms_agent(MyTwin, "agent.cso.jane", role="cso", department="sales")
        reply = await agentcomms_sender.request("agent.cso.jane", "request_knowledge", {"query": "Q4?"})
        assert reply.success

Fixtures:

* ``agentcomms_redis`` (session): a private redis-server in a temporary folder (the same
  embedded server the library uses; ``AGENTCOMMS_REDIS_SERVER`` picks the binary).
* ``agentcomms_settings``: :class:`Settings` on that server, its database emptied first, with a
  short ``claim_idle`` (0.5 s) so that redelivery tests do not wait 30 s.
* ``agentcomms_sender``: a connected :class:`MessageSender` (id ``test.sender``).
* ``agentcomms_agent``: starts agents from your classes (registered and consuming when it
  returns); every one is shut down after the test.

The plugin changes nothing until a test asks for one of its fixtures.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, TypeVar

import pytest
import pytest_asyncio
import redis

from agentcomms.agent import BaseAgent
from agentcomms.embedded import EmbeddedRedis
from agentcomms.sender import MessageSender
from agentcomms.settings import Settings, create_agent_config

__all__ = ["AgentStarter", "agentcomms_agent", "agentcomms_redis", "agentcomms_sender", "agentcomms_settings"]

_A = TypeVar("_A", bound=BaseAgent)


class AgentStarter:
    """What ``agentcomms_agent`` is: ``await agentcomms_agent(MyTwin, "agent.id", role=..., ...)``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started: list[BaseAgent] = []

    async def __call__(
        self,
        agent_class: type[_A],
        agent_id: str,
        *,
        role: str = "tester",
        department: str = "testing",
        capabilities: Sequence[str] = (),
        user_name: str | None = None,
        settings: Settings | None = None,
        **kwargs: Any,
    ) -> _A:
        """Start an agent of ``agent_class`` (registered and consuming when it returns); stopped by :meth:`close`."""
        name = user_name or agent_id.rsplit(".", 1)[-1]
        config = create_agent_config(agent_id, name, role, department, list(capabilities))
        agent = agent_class(config, settings=settings or self.settings, **kwargs)
        await agent.initialize()
        self.started.append(agent)
        return agent

    async def close(self) -> None:
        """Shut down every agent it started, the last first."""
        while self.started:
            await self.started.pop().shutdown()


@pytest.fixture(scope="session")
def agentcomms_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A private redis-server for the test session (``AGENTCOMMS_REDIS_SERVER`` picks the binary)."""
    folder = tmp_path_factory.mktemp("agentcomms-redis")
    with EmbeddedRedis(folder, binary=os.environ.get("AGENTCOMMS_REDIS_SERVER")) as server:
        yield server


@pytest.fixture
def agentcomms_settings(agentcomms_redis: EmbeddedRedis) -> Settings:
    """Settings on the session's Redis, whose database is emptied first; ``claim_idle`` 0.5 s."""
    client = redis.Redis.from_url(agentcomms_redis.url)
    try:
        client.flushall()
    finally:
        client.close()
    return Settings(redis_url=agentcomms_redis.url, claim_idle=0.5)


@pytest_asyncio.fixture
async def agentcomms_sender(agentcomms_settings: Settings) -> AsyncIterator[MessageSender]:
    """A connected :class:`MessageSender` whose id is ``test.sender``."""
    async with MessageSender(settings=agentcomms_settings, sender_id="test.sender") as sender:
        yield sender


@pytest_asyncio.fixture
async def agentcomms_agent(agentcomms_settings: Settings) -> AsyncIterator[AgentStarter]:
    """Starts agents from classes: registered and consuming when it returns; all shut down after the test."""
    starter = AgentStarter(agentcomms_settings)
    try:
        yield starter
    finally:
        await starter.close()
