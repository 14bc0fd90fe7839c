"""Knowledge memory: role-based search over company documents and shared insights (docs/knowledge.md).

``AgentMemoryInterface`` is the API; ``KnowledgeService`` the agent that owns the
embedded store; ``MiniLMEmbedder`` the local default embedder; ``EdgeStore`` /
``ServerStore`` the embedded and server Qdrant stores.
"""

from agentcomms.knowledge.embedder import Embedder, MiniLMEmbedder
from agentcomms.knowledge.interface import AgentMemoryInterface, IngestReport, KnowledgeResult, KnowledgeSource
from agentcomms.knowledge.permissions import DEFAULT_PERMISSIONS, KnowledgePermissions
from agentcomms.knowledge.sources import SkippedFile, SourceDocument, scan_folder
from agentcomms.knowledge.store import EdgeStore, KnowledgeStore, ServerStore

TYPE_CHECKING = False
if TYPE_CHECKING:
    from agentcomms.knowledge.service import KnowledgeService


def __getattr__(name: str) -> object:
    if name == "KnowledgeService":  # an agent: imported on use, since agentcomms.agent imports this package
        from agentcomms.knowledge.service import KnowledgeService

        return KnowledgeService
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_PERMISSIONS",
    "AgentMemoryInterface",
    "EdgeStore",
    "Embedder",
    "IngestReport",
    "KnowledgePermissions",
    "KnowledgeResult",
    "KnowledgeService",
    "KnowledgeSource",
    "KnowledgeStore",
    "MiniLMEmbedder",
    "ServerStore",
    "SkippedFile",
    "SourceDocument",
    "scan_folder",
]
