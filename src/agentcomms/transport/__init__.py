"""The transport: the only code that speaks Redis (connections, pipelining, blocking reads, scripts).

Built on asyncio's Protocol API and hiredis (parsing and packing), with no use of any Redis
client library's internals. One :class:`Pipeliner` per server carries every ordinary
command; each blocking reader and the event-feed subscriber have a connection of their
own. A Redis Cluster is one pipeliner per primary, each command sent to its key's slot's owner
(``transport.cluster``; keys of one agent share a hash tag).
"""

from agentcomms.transport.cluster import ClusterPipeliner, Commands, connect_commands, key_slot
from agentcomms.transport.errors import ReplyError, code_of
from agentcomms.transport.link import EncodableT, LinkLost, NotReady, pack
from agentcomms.transport.pipeliner import FLUSH_AT, READ_TIMEOUT, LazyCommand, Pipeliner, backoff, command_name
from agentcomms.transport.reader import MAX_BLOCK_MS, BlockingReader, stop_blocked, subscribe
from agentcomms.transport.scripts import Script
from agentcomms.transport.spec import ConnectionSpec

__all__ = [
    "FLUSH_AT",
    "MAX_BLOCK_MS",
    "READ_TIMEOUT",
    "BlockingReader",
    "ClusterPipeliner",
    "Commands",
    "ConnectionSpec",
    "EncodableT",
    "LazyCommand",
    "LinkLost",
    "NotReady",
    "Pipeliner",
    "ReplyError",
    "Script",
    "backoff",
    "code_of",
    "command_name",
    "connect_commands",
    "key_slot",
    "pack",
    "stop_blocked",
    "subscribe",
]
