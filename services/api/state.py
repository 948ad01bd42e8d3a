"""What the API server's endpoints share: the ``Runtime`` (everything without HTTP), the auth keys and
the serving objects built once at start-up. Endpoints reach it through ``state_of``; nothing here
imports an endpoint, so the endpoint folders and the app factory import this module and not each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import Response

from coe.batch.jobs import BatchJobs
from coe.errors import BackendUnavailable
from coe.runtime import ChatCompletionRequest, Runtime
from services.api.auth import AuthKeys, VirtualKeys


class ChatEndpoint(Protocol):
    """What ``POST /v1/chat/completions`` calls (``services.api.chat.serving.ChatServing``; named by
    shape so that this module imports no endpoint)."""

    async def create(self, request: Request, body: ChatCompletionRequest) -> Response: ...


@dataclass
class ApiState:
    runtime: Runtime
    keys: AuthKeys
    chat: ChatEndpoint
    vkeys: VirtualKeys | None = None  # virtual keys (``coe.keys``) on the runtime's store


def state_of(app: Any) -> ApiState:
    state: ApiState | None = getattr(app.state, "coe", None)
    if state is None:
        raise BackendUnavailable("coe is starting", retry_after=1)
    return state


def runtime_of(app: Any) -> Runtime:
    return state_of(app).runtime


def jobs_of(app: Any) -> BatchJobs:
    jobs = runtime_of(app).jobs
    if jobs is None:
        raise BackendUnavailable("batch storage is not ready yet", retry_after=1)
    return jobs
