"""``agentcomms schema``: the JSON Schema of every message type."""

from __future__ import annotations

import json
import sys

from agentcomms.schemas import export_json_schemas


def schema() -> None:
    """Print the JSON Schema of every message type."""
    sys.stdout.write(json.dumps(export_json_schemas(), indent=2) + "\n")
