"""`fulcrum serve`: registered into the `fulcrum` parser by cluster/cli.py (to come with its issue)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this module's subcommand(s) to the `fulcrum` parser; each sets `func` (args -> exit code)."""
