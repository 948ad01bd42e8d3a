"""The OpenAI-compatible API server: ``create_app`` builds it; one folder per endpoint family."""

from services.api.app import create_app

__all__ = ["create_app"]
