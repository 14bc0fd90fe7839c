"""``agentcomms schema``: the JSON Schema of every message type."""

from __future__ import annotations

import json

from agentcomms.cli._common import LogLevelOption, configure_logging, write_out
from agentcomms.schemas import export_json_schemas


def schema(log_level: LogLevelOption = None) -> None:
    """Print the JSON Schema of every message type."""
    configure_logging(log_level)
    write_out(json.dumps(export_json_schemas(), indent=2) + "\n")
