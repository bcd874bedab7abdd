"""The two consoles of the `fulcrum` command: results on stdout, notes and errors on stderr. A module of its
own so that every command module can print without importing cluster/cli.py (which imports them all)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)


def err_line(prefix: str, text: str) -> None:
    """One line on stderr: a (styled) prefix, then text printed as it is (never read as markup: a message
    holding `[low, high]` keeps it)."""
    err_console.print(f"{prefix} {escape(text)}", highlight=False, soft_wrap=True)


def note(text: str | None) -> None:
    if text:
        err_line("note:", text)
