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
from agentcomms.broker import MessageBroker
from agentcomms.exceptions import (
    AgentCommsError,
    AgentNotFoundError,
    NoAgentAvailableError,
    PermissionDeniedError,
    RegistrationConflictError,
    RegistrationError,
)
from agentcomms.schemas import AgentInfo, AgentStatus, MessageIntent, describe_errors
from agentcomms.security.records import RecordGuard
from agentcomms.settings import Settings
from agentcomms.transport import Script, backoff
from agentcomms.transport.scripts import (
    REGISTRY_BEAT,
    REGISTRY_DEREGISTER,
    REGISTRY_FIND,
    REGISTRY_LEAVE,
    REGISTRY_REGISTER,
    REGISTRY_SET_STATUS,
    REGISTRY_STATS,
)

__all__ = ["AgentRegistry", "Presence", "RegistryStats"]

logger = logging.getLogger(__name__)

_LEAVE_TIMEOUT = 5.0
"""Seconds a stopping instance tries to leave the registry before giving up (offline after 3 beats then)."""

_STORED_FIELDS = {
    "agent_id",
    "user_name",
    "role",
    "department",
    "capabilities",
    "supported_intents",
    "version",
    "metadata",
}


@dataclass(slots=True)
class RegistryStats:
    """Counts of registered agents, in total and by role and department."""

    total_agents: int = 0
    online_agents: int = 0
    malformed_records: int = 0
    """Records that are not valid (written by hand, or by an incompatible version): skipped and logged."""
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
            "malformed_records": self.malformed_records,
            "by_role": self.by_role,
            "by_department": self.by_department,
        }


def _ms_to_datetime(value: bytes | str) -> datetime | None:
    return datetime.fromtimestamp(int(value) / 1000, UTC) if value else None


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _normal(value: str) -> str:
    """How index values are compared: stripped and case-folded (``Straßenbau`` = ``STRASSENBAU``), in Python only."""
    return value.strip().casefold()


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
        self._record_guard: RecordGuard | None = None
        self.malformed_records = 0
        """Malformed records met by discovery and statistics so far (each skipped and logged once)."""
        self._malformed_seen: set[str] = set()

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

    @property
    def _guard(self) -> RecordGuard | None:
        """With security on: signs what this process registers and checks what it reads."""
        security = self.broker.security
        if security is None:
            return None
        if self._record_guard is None:
            self._record_guard = RecordGuard(security)
        return self._record_guard

    def _owner(self, agent_id: str) -> None:
        """With security on, refuse to write presence or removal for an agent this process does not speak for."""
        security = self.broker.security
        if security is not None and agent_id not in security.identities and security.admin_identity() is None:
            raise PermissionDeniedError(f"this process holds no identity for {agent_id!r} (nor an admin's)")

    async def _script(self, script: Script, args: Sequence[str | int], index_keys: Sequence[str] = ()) -> Any:
        # through the pipeliner: batched with other commands, and never cancelled mid-flight; every
        # registry script is safe to repeat after a lost connection (it sets state, it does not add to it)
        return await self.broker.pipeliner.script(
            script, [keys.REGISTRY_AGENTS, *index_keys], [keys.REGISTRY, *args], replay=True
        )

    # -- registration ----------------------------------------------------------------------

    @staticmethod
    def _validate(agent_info: AgentInfo | dict[str, Any]) -> AgentInfo:
        # an AgentInfo is checked again: its fields may have been assigned since it was made
        raw = agent_info.model_dump() if isinstance(agent_info, AgentInfo) else agent_info
        try:
            return AgentInfo.model_validate(raw)
        except ValidationError as exc:
            problems = describe_errors(exc)
            agent_id = raw.get("agent_id") if isinstance(raw, dict) else None
            raise RegistrationError(problems, agent_id=agent_id if isinstance(agent_id, str) else None) from None

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
        guard = self._guard
        stored = info.model_dump_json(include=_STORED_FIELDS)
        if guard is not None:  # security on: only its identity (or an admin) writes it, signed
            guard.authorize(info, replace=replace)
            fields = json.loads(stored)
            fields["signature"] = await guard.sign(info, fields)
            stored = json.dumps(fields, separators=(",", ":"))
        interval = heartbeat_interval or self.settings.heartbeat_interval
        role_index = keys.registry_index("role", info.role)  # first: the script compares roles by it
        indexes = [role_index, keys.registry_index("department", info.department)]
        indexes += [keys.registry_index("capability", c) for c in dict.fromkeys(map(_normal, info.capabilities))]
        intents = dict.fromkeys(_normal(str(i)) for i in info.supported_intents)
        indexes += [keys.registry_index("intent", i) for i in intents]
        result = await self._script(
            REGISTRY_REGISTER,
            [
                info.agent_id,
                stored,
                role_index,
                "1" if replace else "0",
                instance_id or info.agent_id,
                int(interval * 1000),
                json.dumps(indexes),
            ],
        )
        status, value = _text(result[0]), _text(result[1])
        if status == "conflict":
            raise RegistrationConflictError(agent_id=info.agent_id, existing_role=value, role=info.role)
        logger.info("registered %s (%s, %s)", info.agent_id, info.role, info.department)
        return await self.get_agent(info.agent_id)

    async def heartbeat(self, agent_id: str, *, instance_id: str | None = None, interval: float | None = None) -> bool:
        """Record that an instance of ``agent_id`` is alive; ``False`` if the agent is not registered."""
        self._owner(agent_id)
        interval = interval or self.settings.heartbeat_interval
        result = await self._script(REGISTRY_BEAT, [agent_id, instance_id or agent_id, int(interval * 1000)])
        return result is not None

    async def leave(self, agent_id: str, *, instance_id: str | None = None) -> int:
        """An instance stops cleanly; the agent is offline at once if it was the last. Returns instances left."""
        self._owner(agent_id)
        return int(await self._script(REGISTRY_LEAVE, [agent_id, instance_id or agent_id]))

    async def deregister_agent(self, agent_id: str) -> bool:
        """Remove an agent and its index entries; ``False`` if it was not registered.

        Raises:
            PermissionDeniedError: security is on and this process holds neither the agent's identity nor an admin's.
        """
        self._owner(agent_id)
        return bool(await self._script(REGISTRY_DEREGISTER, [agent_id]))

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
        self._owner(agent_id)
        if not await self._script(REGISTRY_SET_STATUS, [agent_id, value.value]):
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
            REGISTRY_FIND, ["1" if online_only else "0", json.dumps(ids) if ids is not None else ""], index_keys
        )
        agents = []
        for i in range(1, len(result), 7):
            agent_id, info, online, status, seen, instances, started = result[i : i + 7]
            try:
                agent = AgentInfo.model_validate_json(info)  # the stored, validated part
                is_online = online == b"1"
                if not is_online:
                    agent.status = AgentStatus.OFFLINE
                else:
                    agent.status = AgentStatus(_text(status)) if status else AgentStatus.ONLINE
                agent.last_seen = _ms_to_datetime(seen)
                agent.started_at = _ms_to_datetime(started)
                agent.instance_count = int(instances) if is_online else 0
            except (ValidationError, ValueError, OverflowError, OSError) as exc:  # e.g. a last beat of 10**30 ms
                self._malformed(_text(agent_id), exc)
                continue
            if self._guard is not None and not await self._guard.believe(agent.agent_id, info):
                continue  # not signed for its role: an impostor, or a role changed by hand
            agents.append(agent)
        return sorted(agents, key=lambda a: a.agent_id)

    def _malformed(self, agent_id: str, error: Exception) -> None:
        """A record someone wrote by hand (or a newer version with fields this one does not know): skipped."""
        self.malformed_records += 1
        if agent_id not in self._malformed_seen:
            self._malformed_seen.add(agent_id)
            logger.warning("skipping the malformed registry record of %r: %s", agent_id[:200], str(error)[:300])

    async def get_agent(self, agent_id: str) -> AgentInfo:
        """The record of one agent, with its current status.

        Raises:
            AgentNotFoundError: it is not registered.
        """
        found = await self._find([], online_only=False, ids=[agent_id])
        if not found:
            raise AgentNotFoundError(agent_id)
        return found[0]

    async def pick_agent(
        self,
        role: str | None = None,
        *,
        department: str | None = None,
        capability: str | None = None,
        exclude: Sequence[str] = (),
    ) -> AgentInfo:
        """An online agent with ``role`` (and ``capability``, if given), chosen at random to spread load.

        Raises:
            NoAgentAvailableError: none is online.
        """
        found = await self.discover_agents(role=role, department=department, capability=capability, online_only=True)
        candidates = [a for a in found if a.agent_id not in exclude]
        if not candidates:
            raise NoAgentAvailableError(role or "", department=department, capability=capability)
        return random.choice(candidates)

    async def is_registered(self, agent_id: str) -> bool:
        """Whether ``agent_id`` is registered (online or not)."""
        return bool(await self.broker.pipeliner.call("HEXISTS", keys.REGISTRY_AGENTS, agent_id, replay=True))

    async def get_online_agents(self) -> list[AgentInfo]:
        """Every agent online now."""
        return await self._find([], online_only=True)

    async def get_registry_stats(self) -> RegistryStats:
        """Counts of agents and online agents, in total and by role and department (walks all agents)."""
        result = await self._script(REGISTRY_STATS, [])
        stats = RegistryStats()
        for i in range(1, len(result), 4):
            agent_id, role, department, online = (_text(v) for v in result[i : i + 4])
            if not role or not department:
                self._malformed(agent_id, ValueError("not a JSON record with a role and a department"))
                stats.malformed_records += 1
                continue
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
        self.healthy = True
        """Whether the last heartbeat (or registration) went through."""

    @property
    def agent_id(self) -> str:
        """The agent this presence keeps online."""
        return self.info.agent_id

    @property
    def running(self) -> bool:
        """Whether it is still beating."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start beating (called by :meth:`AgentRegistry.keep_alive`)."""
        self._task = asyncio.create_task(self._run(), name=f"heartbeat-{self.agent_id}")

    async def _run(self) -> None:
        try:
            await self._beat_forever()
        except asyncio.CancelledError:
            if not self._stopping:
                # cancelled without stop(): the program ended (asyncio.run cancels what is left) or was
                # interrupted. Leave now, so the agent is not shown online (and sent work) for 3 intervals.
                await self._leave(timeout=1.0)
            raise

    async def _beat_forever(self) -> None:
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
                self.healthy = True
                if attempt:
                    logger.info("%s: heartbeat works again", self.agent_id)
                attempt = 0
            except AgentCommsError as exc:  # unreachable, READONLY past reconnect_timeout, refused ...
                attempt += 1
                self.healthy = False
                logger.warning("%s: heartbeat failed (%s); retrying", self.agent_id, exc)
            except Exception:  # never stop beating while the agent runs: it would look offline while working
                attempt += 1
                self.healthy = False
                logger.exception("%s: heartbeat failed unexpectedly; retrying", self.agent_id)

    async def _leave(self, *, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.registry.leave(self.agent_id, instance_id=self.instance_id), timeout)
        except (AgentCommsError, TimeoutError) as exc:
            logger.warning("%s: could not leave cleanly (%s); offline after three missed beats", self.agent_id, exc)

    async def stop(self) -> None:
        """Stop beating and leave: the agent is offline at once if this was its last instance."""
        if self._task is None:
            return
        self._stopping = True
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        # bounded: a program stopping while Redis is away should not hang for reconnect_timeout
        await self._leave(timeout=min(_LEAVE_TIMEOUT, self.registry.settings.reconnect_timeout))
