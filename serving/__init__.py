"""Ray Serve: one frozen base per replica with hot-swappable adapters behind an OpenAI-compatible API
(`fulcrum serve`, docs/serving.md)."""
