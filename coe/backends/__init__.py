"""Where experts run: the backend interface, the vLLM HTTP client and local vLLM processes coe manages."""
