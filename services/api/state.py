"""What the API server's endpoints share: the ``Runtime`` (everything without HTTP), the auth keys and
the serving objects built once at start-up. Endpoints reach it through ``state_of``; nothing here
imports an endpoint, so the endpoint folders and the app factory import this module and not each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from coe.batch.jobs import BatchJobs
from coe.errors import BackendUnavailable
from coe.runtime import Runtime
from services.api.auth import AuthKeys

if TYPE_CHECKING:
    from services.api.chat.serving import ChatServing


@dataclass
class ApiState:
    runtime: Runtime
    keys: AuthKeys
    chat: ChatServing


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
