"""Built-in general text (`builtin:python-docs`): a held-out set for measuring forgetting (`eval.general`)
and a replay source (`data.replay.source`) that needs no download.

It is built, deterministically, from a packaged source every Python install has: the docstrings of a fixed
list of standard-library modules and their public functions and classes, one paragraph of at least 20
words per row. That is ordinary technical English, unrelated to a fine-tuning task, which is what a
forgetting check needs: a rise in its loss after training is knowledge the base had and lost.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from typing import Any

PREFIX = "builtin:"
MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "glob",
    "gzip", "hashlib", "heapq", "html", "http.client", "inspect", "io", "ipaddress", "itertools", "json",
    "logging", "math", "mimetypes", "operator", "os", "pathlib", "pickle", "pprint", "queue", "random",
    "re", "secrets", "shlex", "shutil", "socket", "sqlite3", "statistics", "string", "struct",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "tokenize",
    "traceback", "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref", "zipfile", "zlib",
)  # fmt: skip
SETS = {"python-docs": "paragraphs of Python standard-library docstrings (about 600 rows of text)"}


def is_builtin(path: str | None) -> bool:
    return bool(path) and str(path).startswith(PREFIX)


def problem(path: str) -> str | None:
    """Why `path` names no built-in set, or None."""
    name = path.removeprefix(PREFIX)
    if name in SETS:
        return None
    known = ", ".join(PREFIX + n for n in SETS)
    return f"unknown built-in data `{path}`; the built-in sets are: {known}"


def builtin_rows(path: str, max_rows: int = 2000) -> list[dict[str, Any]]:
    """The rows of a built-in set (`text` rows), in a fixed order."""
    if problem(path):
        raise ValueError(problem(path))
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    with warnings.catch_warnings():  # (reading some docstrings warns about deprecated aliases)
        warnings.simplefilter("ignore")
        _collect(rows, seen, max_rows)
    return rows


def _collect(rows: list[dict[str, Any]], seen: set[str], max_rows: int) -> None:
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a Python built without it (sqlite3, say): the set is a little smaller
            continue
        members = [module] + [
            obj
            for attr, obj in sorted(vars(module).items())
            if not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
            and getattr(obj, "__module__", None) == module.__name__
        ]  # fmt: skip
        for obj in members:
            for paragraph in re.split(r"\n\s*\n", inspect.getdoc(obj) or ""):
                text = " ".join(paragraph.split())
                if len(text.split()) >= 20 and text not in seen and ">>>" not in text:
                    seen.add(text)
                    rows.append({"text": text})
                    if len(rows) >= max_rows:
                        return
