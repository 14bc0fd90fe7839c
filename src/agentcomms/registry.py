"""AgentRegistry: registration, heartbeats and discovery whose cost grows with the answer.

Every operation is one Lua script on keys that share the ``{registry}`` hash tag, so it
is atomic and valid on Redis Cluster. Times come from the Redis server (``TIME`` inside
the scripts), never from a client's clock: an agent is online while its deadline,
``last heartbeat + 3 x its heartbeat interval``, is in the server's future.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

from pydantic import ValidationError

from agentcomms import keys
from agentcomms._redis import TRANSIENT_ERRORS, Script, backoff, decode
from agentcomms.broker import MessageBroker
from agentcomms.exceptions import (
    AgentNotFoundError,
    BrokerConnectionError,
    NoAgentAvailableError,
    RegistrationConflictError,
    RegistrationError,
)
from agentcomms.schemas import AgentInfo, AgentStatus, MessageIntent, describe_errors
from agentcomms.settings import Settings

__all__ = ["AgentRegistry", "Presence", "RegistryStats"]

logger = logging.getLogger(__name__)

_LUA_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_LUA_BEAT = """
local function beat(prefix, agent, instance, interval, now)
  local inst = prefix .. ':inst:' .. agent
  local deadline = now + 3 * interval
  redis.call('ZADD', inst, deadline, instance)
  redis.call('ZREMRANGEBYSCORE', inst, '-inf', now)  -- instances that stopped beating
  redis.call('ZADD', prefix .. ':deadlines', 'GT', deadline, agent)
  redis.call('HSET', prefix .. ':seen', agent, now)
  redis.call('HSET', prefix .. ':instcount', agent, redis.call('ZCARD', inst))
end
"""

_REGISTER = Script(
    _LUA_NOW
    + _LUA_BEAT
    + """
-- ARGV: prefix, agent id, info JSON, role (lower case), replace ('1'/'0'), instance, interval ms, index keys JSON
local prefix, agent = ARGV[1], ARGV[2]
local old = redis.call('HGET', prefix .. ':agents', agent)
if old and ARGV[5] ~= '1' then
  local old_role = cjson.decode(old)['role']
  if string.lower(old_role) ~= ARGV[4] then return {'conflict', old_role} end
end
local old_indexes = redis.call('HGET', prefix .. ':indexes', agent)
if old_indexes then
  for _, key in ipairs(cjson.decode(old_indexes)) do redis.call('SREM', key, agent) end
end
for _, key in ipairs(cjson.decode(ARGV[8])) do redis.call('SADD', key, agent) end
redis.call('HSET', prefix .. ':agents', agent, ARGV[3])
redis.call('HSET', prefix .. ':indexes', agent, ARGV[8])
redis.call('HSETNX', prefix .. ':started', agent, now)
redis.call('HDEL', prefix .. ':status', agent)
beat(prefix, agent, ARGV[6], tonumber(ARGV[7]), now)
return {'ok', tostring(now)}
"""
)

_BEAT = Script(
    _LUA_NOW
    + _LUA_BEAT
    + """
-- ARGV: prefix, agent id, instance, interval ms
if redis.call('HEXISTS', ARGV[1] .. ':agents', ARGV[2]) == 0 then return false end
beat(ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), now)
return tostring(now)
"""
)

_LEAVE = Script(
    _LUA_NOW
    + """
-- ARGV: prefix, agent id, instance. One instance stops cleanly; the agent goes offline with its last one.
local prefix, agent = ARGV[1], ARGV[2]
local inst = prefix .. ':inst:' .. agent
redis.call('ZREM', inst, ARGV[3])
redis.call('ZREMRANGEBYSCORE', inst, '-inf', now)
local top = redis.call('ZRANGE', inst, -1, -1, 'WITHSCORES')
if #top == 0 then
  redis.call('ZREM', prefix .. ':deadlines', agent)
else
  redis.call('ZADD', prefix .. ':deadlines', 'XX', top[2], agent)
end
if redis.call('HEXISTS', prefix .. ':agents', agent) == 1 then
  redis.call('HSET', prefix .. ':instcount', agent, redis.call('ZCARD', inst))
end
return #top
"""
)

_DEREGISTER = Script(
    """
-- ARGV: prefix, agent id
local prefix, agent = ARGV[1], ARGV[2]
if redis.call('HEXISTS', prefix .. ':agents', agent) == 0 then return 0 end
local indexes = redis.call('HGET', prefix .. ':indexes', agent)
if indexes then
  for _, key in ipairs(cjson.decode(indexes)) do redis.call('SREM', key, agent) end
end
for _, hash in ipairs({'agents', 'indexes', 'seen', 'instcount', 'status', 'started'}) do
  redis.call('HDEL', prefix .. ':' .. hash, agent)
end
redis.call('ZREM', prefix .. ':deadlines', agent)
redis.call('DEL', prefix .. ':inst:' .. agent)
return 1
"""
)

_FIND = Script(
    _LUA_NOW
    + """
-- KEYS: index sets to intersect (none: all agents, or the online ones)
-- ARGV: prefix, online only ('1'/'0'), explicit ids (JSON list, or '' to use KEYS)
local prefix = ARGV[1]
local online_only = ARGV[2] == '1'
local deadlines = prefix .. ':deadlines'
local ids
if ARGV[3] ~= '' then
  ids = cjson.decode(ARGV[3])
elseif #KEYS > 0 then
  ids = redis.call('SINTER', unpack(KEYS))   -- cost: the smallest set times the number of sets
elseif online_only then
  ids = redis.call('ZRANGE', deadlines, '(' .. now, '+inf', 'BYSCORE')
else
  ids = redis.call('HKEYS', prefix .. ':agents')
end
local out = {tostring(now)}
for _, id in ipairs(ids) do
  local info = redis.call('HGET', prefix .. ':agents', id)
  local deadline = tonumber(redis.call('ZSCORE', deadlines, id) or '0')
  local online = deadline > now
  if info and (online or not online_only) then
    table.insert(out, id)
    table.insert(out, info)
    table.insert(out, online and '1' or '0')
    table.insert(out, redis.call('HGET', prefix .. ':status', id) or '')
    table.insert(out, redis.call('HGET', prefix .. ':seen', id) or '')
    table.insert(out, redis.call('HGET', prefix .. ':instcount', id) or '0')
    table.insert(out, redis.call('HGET', prefix .. ':started', id) or '')
  end
end
return out
"""
)

_SET_STATUS = Script(
    """
-- ARGV: prefix, agent id, status
if redis.call('HEXISTS', ARGV[1] .. ':agents', ARGV[2]) == 0 then return 0 end
redis.call('HSET', ARGV[1] .. ':status', ARGV[2], ARGV[3])
return 1
"""
)

_STATS = Script(
    _LUA_NOW
    + """
-- ARGV: prefix. Walks every agent: O(number of agents), for dashboards, not for hot paths.
local prefix = ARGV[1]
local all = redis.call('HGETALL', prefix .. ':agents')
local out = {tostring(now)}
for i = 1, #all, 2 do
  local info = cjson.decode(all[i + 1])
  local deadline = tonumber(redis.call('ZSCORE', prefix .. ':deadlines', all[i]) or '0')
  table.insert(out, info['role'])
  table.insert(out, info['department'])
  table.insert(out, deadline > now and '1' or '0')
end
return out
"""
)

_STORED_FIELDS = {"agent_id", "user_name", "role", "department", "capabilities", "supported_intents", "version"}


@dataclass(slots=True)
class RegistryStats:
    """Counts of registered agents, in total and by role and department."""

    total_agents: int = 0
    online_agents: int = 0
    by_role: dict[str, dict[str, int]] = field(default_factory=dict)
    by_department: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def offline_agents(self) -> int:
        """Registered agents not online."""
        return self.total_agents - self.online_agents

    def as_dict(self) -> dict[str, Any]:
        """Plain data, as the seed's ``get_registry_stats()`` returned it."""
        return {
            "total_agents": self.total_agents,
            "online_agents": self.online_agents,
            "offline_agents": self.offline_agents,
            "by_role": self.by_role,
            "by_department": self.by_department,
        }


def _ms_to_datetime(value: bytes | str) -> datetime | None:
    return datetime.fromtimestamp(int(value) / 1000, UTC) if value else None


def _normal(value: str) -> str:
    return value.strip().lower()


class AgentRegistry:
    """Who is on the network: registration, heartbeats, discovery and statistics.

    Args:
        broker: a broker to share connections with; if omitted the registry makes
            (and closes) its own from ``redis_url`` / ``settings``.
        redis_url: where Redis is, when no broker is given.
        settings: defaults for heartbeat intervals and the Redis connection.
    """

    def __init__(
        self,
        broker: MessageBroker | None = None,
        *,
        redis_url: str | None = None,
        settings: Settings | None = None,
    ) -> None:
        self._owns_broker = broker is None
        self.broker = broker or MessageBroker(redis_url, settings=settings, client_name="registry")
        self.settings = self.broker.settings

    async def initialize(self) -> Self:
        """Connect (only needed when the registry owns its broker)."""
        await self.broker.connect()
        return self

    async def close(self) -> None:
        """Disconnect, if the registry owns its broker."""
        if self._owns_broker:
            await self.broker.close()

    async def __aenter__(self) -> Self:
        return await self.initialize()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _script(self, script: Script, args: Sequence[str | int], index_keys: Sequence[str] = ()) -> Any:
        # through the pipeliner: batched with other commands, and never cancelled mid-flight
        return await self.broker.pipeliner.script(script, index_keys, [keys.REGISTRY, *args])

    # -- registration ----------------------------------------------------------------------

    @staticmethod
    def _validate(agent_info: AgentInfo | dict[str, Any]) -> AgentInfo:
        if isinstance(agent_info, AgentInfo):
            return AgentInfo.model_validate(agent_info.model_dump())  # re-check: fields may have been assigned
        try:
            return AgentInfo.model_validate(agent_info)
        except ValidationError as exc:
            problems = describe_errors(exc)
            agent_id = agent_info.get("agent_id")
            raise RegistrationError(problems, agent_id=agent_id if isinstance(agent_id, str) else None) from exc

    async def register_agent(
        self,
        agent_info: AgentInfo | dict[str, Any],
        *,
        replace: bool = False,
        instance_id: str | None = None,
        heartbeat_interval: float | None = None,
    ) -> AgentInfo:
        """Register (or update) an agent and count this instance as online; returns the stored record.

        Registering an id again with the same role updates it (another instance, new
        capabilities). With a different role it is refused unless ``replace=True``.

        Raises:
            RegistrationError: the data is invalid.
            RegistrationConflictError: the id is taken by an agent with another role.
        """
        info = self._validate(agent_info)
        interval = heartbeat_interval or self.settings.heartbeat_interval
        indexes = [keys.registry_index("role", info.role), keys.registry_index("department", info.department)]
        indexes += [keys.registry_index("capability", c) for c in dict.fromkeys(map(_normal, info.capabilities))]
        intents = dict.fromkeys(_normal(str(i)) for i in info.supported_intents)
        indexes += [keys.registry_index("intent", i) for i in intents]
        result = await self._script(
            _REGISTER,
            [
                info.agent_id,
                info.model_dump_json(include=_STORED_FIELDS),
                _normal(info.role),
                "1" if replace else "0",
                instance_id or info.agent_id,
                int(interval * 1000),
                json.dumps(indexes),
            ],
        )
        status, value = decode(result[0]), decode(result[1])
        if status == "conflict":
            raise RegistrationConflictError(agent_id=info.agent_id, existing_role=value, role=info.role)
        logger.info("registered %s (%s, %s)", info.agent_id, info.role, info.department)
        return await self.get_agent(info.agent_id)

    async def heartbeat(self, agent_id: str, *, instance_id: str | None = None, interval: float | None = None) -> bool:
        """Record that an instance of ``agent_id`` is alive; ``False`` if the agent is not registered."""
        interval = interval or self.settings.heartbeat_interval
        result = await self._script(_BEAT, [agent_id, instance_id or agent_id, int(interval * 1000)])
        return result is not None

    async def leave(self, agent_id: str, *, instance_id: str | None = None) -> int:
        """An instance stops cleanly; the agent is offline at once if it was the last. Returns instances left."""
        return int(await self._script(_LEAVE, [agent_id, instance_id or agent_id]))

    async def deregister_agent(self, agent_id: str) -> bool:
        """Remove an agent and its index entries; ``False`` if it was not registered."""
        return bool(await self._script(_DEREGISTER, [agent_id]))

    async def update_status(self, agent_id: str, status: AgentStatus | str) -> None:
        """Set the status an online agent reports (``online`` or ``busy``); offline comes from heartbeats.

        Raises:
            AgentNotFoundError: the agent is not registered.
            RegistrationError: ``status`` is not online or busy.
        """
        try:
            value = AgentStatus(status)
        except ValueError as exc:
            raise RegistrationError(f"unknown status {status!r}", agent_id=agent_id) from exc
        if value is AgentStatus.OFFLINE:
            raise RegistrationError("status offline is set by leave() or missed heartbeats", agent_id=agent_id)
        if not await self._script(_SET_STATUS, [agent_id, value.value]):
            raise AgentNotFoundError(agent_id)

    async def keep_alive(
        self,
        agent_info: AgentInfo | dict[str, Any],
        *,
        replace: bool = False,
        instance_id: str | None = None,
        heartbeat_interval: float | None = None,
    ) -> Presence:
        """Register and keep beating every ``heartbeat_interval`` until the returned presence is stopped."""
        interval = heartbeat_interval or self.settings.heartbeat_interval
        instance = instance_id or f"{uuid.uuid4().hex[:12]}"
        info = await self.register_agent(agent_info, replace=replace, instance_id=instance, heartbeat_interval=interval)
        presence = Presence(self, info, instance, interval, replace)
        presence.start()
        return presence

    # -- discovery -------------------------------------------------------------------------

    async def discover_agents(
        self,
        *,
        role: str | None = None,
        department: str | None = None,
        capability: str | Sequence[str] | None = None,
        intent: MessageIntent | str | None = None,
        online_only: bool = False,
    ) -> list[AgentInfo]:
        """Agents matching every given filter (case-insensitive), sorted by id.

        One script: an intersection of the index sets, whose cost grows with the
        smallest set and the answer, not with the number of registered agents.
        """
        index_keys: list[str] = []
        if role is not None:
            index_keys.append(keys.registry_index("role", role))
        if department is not None:
            index_keys.append(keys.registry_index("department", department))
        capabilities = [capability] if isinstance(capability, str) else list(capability or [])
        index_keys += [keys.registry_index("capability", c) for c in capabilities]
        if intent is not None:
            index_keys.append(keys.registry_index("intent", str(intent)))
        return await self._find(index_keys, online_only=online_only)

    async def _find(self, index_keys: list[str], *, online_only: bool, ids: list[str] | None = None) -> list[AgentInfo]:
        result = await self._script(
            _FIND, ["1" if online_only else "0", json.dumps(ids) if ids is not None else ""], index_keys
        )
        agents = []
        for i in range(1, len(result), 7):
            _, info, online, status, seen, instances, started = result[i : i + 7]
            agent = AgentInfo.model_validate_json(info)  # the stored, validated part
            is_online = online == b"1"
            if not is_online:
                agent.status = AgentStatus.OFFLINE
            else:
                agent.status = AgentStatus(decode(status)) if status else AgentStatus.ONLINE
            agent.last_seen = _ms_to_datetime(seen)
            agent.started_at = _ms_to_datetime(started)
            agent.instance_count = int(instances) if is_online else 0
            agents.append(agent)
        return sorted(agents, key=lambda a: a.agent_id)

    async def get_agent(self, agent_id: str) -> AgentInfo:
        """The record of one agent, with its current status.

        Raises:
            AgentNotFoundError: it is not registered.
        """
        found = await self._find([], online_only=False, ids=[agent_id])
        if not found:
            raise AgentNotFoundError(agent_id)
        return found[0]

    async def pick_agent(self, role: str, *, department: str | None = None, exclude: Sequence[str] = ()) -> AgentInfo:
        """An online agent with ``role`` (chosen at random, to spread load), for addressing by role.

        Raises:
            NoAgentAvailableError: none is online.
        """
        candidates = [
            a
            for a in await self.discover_agents(role=role, department=department, online_only=True)
            if a.agent_id not in exclude
        ]
        if not candidates:
            raise NoAgentAvailableError(role, department=department)
        return random.choice(candidates)

    async def get_online_agents(self) -> list[AgentInfo]:
        """Every agent online now."""
        return await self._find([], online_only=True)

    async def get_registry_stats(self) -> RegistryStats:
        """Counts of agents and online agents, in total and by role and department (walks all agents)."""
        result = await self._script(_STATS, [])
        stats = RegistryStats()
        for i in range(1, len(result), 3):
            role, department, online = (decode(v) for v in result[i : i + 3])
            is_online = online == "1"
            stats.total_agents += 1
            stats.online_agents += is_online
            for bucket, name in ((stats.by_role, role), (stats.by_department, department)):
                counts = bucket.setdefault(name, {"total": 0, "online": 0})
                counts["total"] += 1
                counts["online"] += is_online
        return stats


class Presence:
    """One running instance's registration, kept alive by heartbeats until :meth:`stop`."""

    def __init__(
        self, registry: AgentRegistry, info: AgentInfo, instance_id: str, interval: float, replace: bool
    ) -> None:
        self.registry = registry
        self.info = info
        self.instance_id = instance_id
        self.interval = interval
        self._replace = replace
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.beats = 0

    @property
    def agent_id(self) -> str:
        """The agent this presence keeps online."""
        return self.info.agent_id

    def start(self) -> None:
        """Start beating (called by :meth:`AgentRegistry.keep_alive`)."""
        self._task = asyncio.create_task(self._run(), name=f"heartbeat-{self.agent_id}")

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping:
            await asyncio.sleep(self.interval if attempt == 0 else backoff(attempt, cap=self.interval))
            try:
                registered = await self.registry.heartbeat(
                    self.agent_id, instance_id=self.instance_id, interval=self.interval
                )
                if not registered:  # deregistered by someone, or the registry was wiped: come back
                    logger.warning("%s was not registered at its heartbeat; registering again", self.agent_id)
                    await self.registry.register_agent(
                        self.info,
                        replace=self._replace,
                        instance_id=self.instance_id,
                        heartbeat_interval=self.interval,
                    )
                self.beats += 1
                attempt = 0
            except (*TRANSIENT_ERRORS, BrokerConnectionError) as exc:
                attempt += 1
                logger.warning("%s: heartbeat failed (%s); retrying", self.agent_id, exc)

    async def stop(self) -> None:
        """Stop beating and leave: the agent is offline at once if this was its last instance."""
        if self._task is None:
            return
        self._stopping = True
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        try:
            await self.registry.leave(self.agent_id, instance_id=self.instance_id)
        except (*TRANSIENT_ERRORS, BrokerConnectionError) as exc:
            logger.warning("%s: could not leave cleanly (%s); offline after three missed beats", self.agent_id, exc)
