"""agentcomms.testing as a user meets it: a test suite of their own twin, run by pytest in a subprocess."""

from __future__ import annotations

import pytest

USER_TESTS = """
from typing import Any

from agentcomms import AgentMessage, BaseAgent, HandlerError


class Forecaster(BaseAgent):
    async def handle_request_knowledge(self, message: AgentMessage) -> dict[str, Any]:
        if "forecast" not in message.payload.data.get("query", ""):
            raise HandlerError("unknown_question", "I only know the forecast")
        return {"q4_forecast": "$3.1M"}


async def test_the_forecaster_answers(agentcomms_agent, agentcomms_sender):
    await agentcomms_agent(Forecaster, "agent.cso.jane", role="cso", department="sales")
    reply = await agentcomms_sender.request("agent.cso.jane", "request_knowledge", {"query": "the Q4 forecast?"})
    assert reply.success and reply.data == {"q4_forecast": "$3.1M"}


async def test_other_questions_get_its_error(agentcomms_agent, agentcomms_sender):
    await agentcomms_agent(Forecaster, "agent.cso.jane", role="cso")
    reply = await agentcomms_sender.request("agent.cso.jane", "request_knowledge", {"query": "lunch?"})
    assert not reply.success and reply.error.code == "unknown_question"


async def test_it_is_found_by_role(agentcomms_agent, agentcomms_sender):
    jane = await agentcomms_agent(Forecaster, "agent.cso.jane", role="cso", capabilities=["forecasting"])
    reply = await agentcomms_sender.request_role("cso", "request_knowledge", {"query": "forecast"})
    assert reply.responder_id == jane.agent_id
    assert [a.agent_id for a in await agentcomms_sender.discover_agents(capability="forecasting")] == [jane.agent_id]


async def test_each_test_starts_with_an_empty_redis(agentcomms_sender):
    assert await agentcomms_sender.discover_agents() == []
"""

CONFTEST = 'pytest_plugins = ["agentcomms.testing"]\n'
INI = "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\nfilterwarnings = error\n"


def test_a_user_tests_their_own_twin_with_the_kit(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makeini(INI)
    pytester.makepyfile(test_forecaster=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=4)


def test_without_pytest_asyncio_mode_the_fixtures_still_work_in_marked_tests(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")  # strict mode: the default
    pytester.makepyfile(
        test_strict="""
import pytest

@pytest.mark.asyncio
async def test_sender_is_connected(agentcomms_sender):
    assert (await agentcomms_sender.broker.health_check())["status"] == "healthy"
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=1)
