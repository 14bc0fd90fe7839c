"""Schemas: validation limits, custom intents, the seed's response shape, JSON Schema export."""

from __future__ import annotations

import json
import multiprocessing
import time
import uuid

import pytest
from pydantic import ValidationError

from agentcomms import AgentInfo, AgentMessage, AgentResponse, MessageIntent, MessagePayload, export_json_schemas
from agentcomms.schemas import id_time_ms


def test_seed_message_shape_round_trips() -> None:
    raw = {
        "message_id": "8b0e4c1e-0000-4000-8000-000000000001",
        "conversation_id": "8b0e4c1e-0000-4000-8000-000000000002",
        "sender_id": "agent.user1",
        "recipient_id": "agent.sarah",
        "intent": "assign_task",
        "payload": {
            "data": {"task_id": "TASK_001", "description": "..."},
            "priority": "high",
            "requires_response": True,
            "response_timeout": 300,
        },
        "timestamp": "2024-01-01T12:00:00Z",
    }
    message = AgentMessage.model_validate(raw)
    assert message.intent is MessageIntent.ASSIGN_TASK
    assert AgentMessage.model_validate_json(message.model_dump_json()) == message


def test_custom_intents_are_accepted_and_built_ins_become_members() -> None:
    custom = AgentMessage(sender_id="a", recipient_id="b", intent="review_budget")
    assert custom.intent == "review_budget" and not isinstance(custom.intent, MessageIntent)
    assert AgentMessage(sender_id="a", recipient_id="b", intent="health_check").intent is MessageIntent.HEALTH_CHECK
    assert MessageIntent("agent_status") is MessageIntent.AGENT_STATUS  # used by the seed's broadcast example
    with pytest.raises(ValidationError):
        AgentMessage(sender_id="a", recipient_id="b", intent="Not An Intent!")


@pytest.mark.parametrize("bad_id", ["", "agent.{tag}", "agent cmo", "x" * 129, "-leading"])
def test_agent_ids_are_validated(bad_id: str) -> None:
    with pytest.raises(ValidationError):
        AgentMessage(sender_id=bad_id, recipient_id="agent.ok", intent="health_check")


def test_payload_limits() -> None:
    with pytest.raises(ValidationError):
        MessagePayload(response_timeout=0)
    with pytest.raises(ValidationError):
        MessagePayload.model_validate({"data": {}, "unknown": 1})


def test_response_reads_like_the_seeds_dict() -> None:
    ok = AgentResponse.ok({"pipeline": 3})
    assert ok.get("success") is True and ok["data"] == {"pipeline": 3} and ok.get("nope", 7) == 7
    failed = AgentResponse.fail("timeout", "too slow")
    assert failed["error"] == {"code": "timeout", "message": "too slow"}
    with pytest.raises(KeyError):
        failed["missing"]


def test_agent_info_limits() -> None:
    with pytest.raises(ValidationError):
        AgentInfo(agent_id="agent.a", user_name="a", role="cmo", department="x", capabilities=["c"] * 65)


def test_json_schemas_export() -> None:
    schemas = export_json_schemas()
    assert set(schemas) == {"AgentMessage", "MessagePayload", "AgentResponse", "AgentInfo"}
    message_schema = schemas["AgentMessage"]
    assert {"sender_id", "recipient_id", "intent"} <= set(message_schema["required"])
    json.dumps(schemas)  # plain JSON


def _ids(count: int) -> list[str]:
    return [AgentMessage(sender_id="a", recipient_id="b", intent="x").message_id for _ in range(count)]


def test_message_ids_are_time_ordered_uuid7_text_and_a_forked_child_gets_its_own() -> None:
    before = time.time_ns() // 1_000_000
    ids = _ids(3000)  # more than one pooled read of random bytes
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == 3000
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 7 and parsed.variant == uuid.RFC_4122
        made = id_time_ms(text)
        assert made is not None and before <= made <= after
    assert id_time_ms(str(uuid.uuid4())) is None and id_time_ms("conv-1") is None
    _ids(1)  # the parent has unused pooled bytes when it forks
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child = pool.apply(_ids, (500,))
    assert not set(child) & set(_ids(500))
