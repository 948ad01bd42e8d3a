"""coe: a composition-of-experts gateway. One OpenAI-compatible endpoint; experts on vLLM.

The library core: registry (``config``, ``loader``, ``registry``), dispatch,
backends, stores, metrics, errors, and the CLI. Nothing happens at import time.
"""

__version__ = "0.1.0"
