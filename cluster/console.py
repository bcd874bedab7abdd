"""The two consoles of the `fulcrum` command: results on stdout, notes and errors on stderr. A module of its
own so that every command module can print without importing cluster/cli.py (which imports them all)."""

from __future__ import annotations

from rich.console import Console

console = Console()
err_console = Console(stderr=True)
