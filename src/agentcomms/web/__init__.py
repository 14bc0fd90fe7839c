"""The dashboard's web app: a FastAPI app with a REST API under ``/api`` (needs the ``web`` extra).

``create_app(settings)`` builds it; its lifespan owns the Redis connections.
"""

from agentcomms.web.app import create_app

__all__ = ["create_app"]
