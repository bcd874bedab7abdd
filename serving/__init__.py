"""Ray Serve: one frozen base per replica with hot-swappable adapters (arrives with the serving issue)."""
