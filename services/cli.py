"""The ``coe`` console command: every command of ``coe.cli`` plus ``serve``, the one that needs HTTP.

It lives here because the core (``coe``) never imports ``services``; ``python -m services.cli`` is the
same command.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from coe import cli


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from coe.loader import load_registry
    from coe.logs import configure
    from coe.telemetry.setup import resolve as resolve_telemetry
    from routers import make_router
    from services.api import create_app
    from services.api.auth import resolve_keys

    configure(args.log_level)
    cfg = load_registry(args.config)  # fail fast, with the file's own error lines
    if args.workers != 1:
        from services.workers import check_workers

        problem = check_workers(cfg, args.workers)
        if problem is not None:
            print(f"coe serve: {problem}", file=sys.stderr)
            return 2
    make_router(cfg)  # and fit the router's classifier now, if it needs one, with its progress on stderr
    resolve_keys(cfg.auth)
    resolve_telemetry(cfg.telemetry, os.environ)  # a tracing setting nothing can export to: say so now
    if args.workers != 1:
        from services.workers import serve_workers

        return serve_workers(args, cfg)
    app = create_app(args.config, config=cfg)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=args.drain_timeout, lifespan="on")
    server = _graceful_server_class()(config)
    logging.getLogger("coe").info("serving %s on http://%s:%d/v1", args.config, args.host, args.port)
    server.run()
    return 0 if server.started else 1


def _graceful_server_class() -> Any:
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """Exit 0 after a graceful SIGTERM/SIGINT instead of re-raising the signal (uvicorn's default),
        so supervisors see a clean stop once in-flight requests drained and managed backends stopped."""

        @contextlib.contextmanager
        def capture_signals(self):  # type: ignore[no-untyped-def]
            with super().capture_signals():
                try:
                    yield
                finally:
                    self._captured_signals.clear()

    return GracefulServer


def add_serve(sub: Any, command: cli.Command) -> None:
    serve = command(sub.add_parser("serve", help="run the OpenAI-compatible API server"), cmd_serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--drain-timeout", type=float, default=30.0,
                       help="seconds to let in-flight requests finish on SIGTERM")
    serve.add_argument("--workers", type=int, default=1,
                       help="API processes on this port (more than 1 needs Redis; see services/workers.py)")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv, extend=add_serve)


if __name__ == "__main__":
    sys.exit(main())
