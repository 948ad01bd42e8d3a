"""The deployable processes: the API server (``services.api``). Thin: wiring and HTTP."""
