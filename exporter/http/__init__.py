"""The one ASGI app: /metrics, health, the JSON API and (later) the security endpoints."""

from exporter.http.app import create_app

__all__ = ["create_app"]
