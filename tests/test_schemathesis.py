"""The API against its own OpenAPI schema: schemathesis (its CLI, as a user runs it) generates requests for
every operation, auth on, upstreams a STUB (``coe.testing``: the point is coe's own HTTP surface). Wanted: no
server error, and every response as documented (status codes, content types, headers, bodies, ``Allow``
on 405, 401 without a key).

Two checks are left out, on purpose: ``positive_data_acceptance`` and ``negative_data_rejection`` ask that
the schema alone decide what is accepted, but coe also checks what a schema cannot say (an expert's backend
must exist, a strategy must be registered, a file must be UTF-8 batch lines) and answers those with a 400.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from coe.testing.server import serve_app
from coe.testing.stub_upstream import StubRecord, create_stub_app
from services.api import create_app

pytest.importorskip("schemathesis")
ST = Path(sys.executable).parent / "st"


async def test_every_operation_conforms_to_the_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ST_CLIENT_KEYS", "client-key")
    monkeypatch.setenv("ST_ADMIN_KEY", "admin-key")
    config = tmp_path / "experts.yaml"
    async with serve_app(create_stub_app(record=StubRecord())) as stub:
        config.write_text(
            f"backends: {{stub: {{url: '{stub}/v1'}}}}\n"
            "experts: [{name: fast, backend: stub, model: stub}]\n"
            "auth: {client_auth: true, admin_auth: true, api_keys_env: ST_CLIENT_KEYS, admin_key_env: ST_ADMIN_KEY}\n")
        async with serve_app(create_app(config)) as url:
            proc = await asyncio.create_subprocess_exec(
                str(ST), "run", f"{url}/openapi.json", "--checks", "all",
                "--exclude-checks", "positive_data_acceptance,negative_data_rejection",
                "--max-examples", "20", "--generation-deterministic",
                "--request-timeout", "20", "-H", "Authorization: Bearer admin-key",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
                env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_TELEMETRY": "false"})
            out, _ = await asyncio.wait_for(proc.communicate(), 600)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-8000:]
    assert "Tested: 2" in text  # every operation was reached (20 of them today)
