"""Constrained decoding: `response_format` and `tools` as grammars, and a grammar's state per row as the
engine's `TokenConstraint` (serving/types.py).

The library is llguidance (docs/serving.md says why): a JSON schema becomes a grammar here, on the ingress,
with no tokenizer (so a schema it cannot compile is a 400 naming the field before any replica works on it);
the replica builds one `LLMatcher` per request over the base's tokenizer, and the engine asks it for the
allowed next tokens before every sample.
"""

from __future__ import annotations

import json
import re
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the ingress imports this module for the grammars and never needs torch
    import torch

# Compact JSON (no whitespace between tokens): a model that may emit whitespace forever, may.
JSON_OPTIONS = {"whitespace_flexible": False}
TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


class GrammarError(ValueError):
    """A response_format or tool schema that cannot be compiled into a grammar."""


# --------------------------------------------------------------------------- grammars (ingress side)
def _compile(schema: dict[str, Any], where: str) -> str:
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"`{where}` is not a usable JSON schema: {e}") from None
    error = LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        first = error.strip().splitlines()[0] if error.strip() else error
        raise GrammarError(f"`{where}` is not a usable JSON schema: {first}")
    return grammar


def response_format_grammar(response_format: dict[str, Any] | None) -> str | None:
    """The grammar for OpenAI's `response_format` (None: free text)."""
    if not response_format or response_format.get("type") == "text":
        return None
    if response_format["type"] == "json_object":
        return _compile({"type": "object"}, "response_format")
    schema = response_format["json_schema"].get("schema") or {"type": "object"}
    return _compile(schema, "response_format.json_schema.schema")


def tool_call_schema(tools: list[dict[str, Any]], name: str | None) -> dict[str, Any]:
    """One call of one of `tools` (or of the tool `name`): {"name": ..., "arguments": {...}}."""
    options = []
    for tool in tools:
        fn = tool["function"]
        if name is not None and fn["name"] != name:
            continue
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return options[0] if len(options) == 1 else {"anyOf": options}


def tools_grammar(tools: list[dict[str, Any]] | None, tool_choice: Any) -> str | None:
    """`tool_choice` "required" or a named function: the answer is one tool call, by grammar. "auto": the
    model writes text or `<tool_call>{...}</tool_call>` (as Hermes/Qwen-style templates teach), parsed
    after the fact; "none": text."""
    if not tools or tool_choice in (None, "auto", "none"):
        return None
    name = tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None
    return _compile(tool_call_schema(tools, name), "tools")


def parse_tool_calls(text: str, tools: list[dict[str, Any]], forced: bool) -> list[dict[str, Any]] | None:
    """OpenAI `tool_calls` from an answer: the whole text when a call was forced by grammar, else every
    `<tool_call>` block naming a known tool (None: the answer is plain text)."""
    import uuid

    known = {t["function"]["name"] for t in tools}
    blobs = [text] if forced else TOOL_CALL.findall(text)
    calls = []
    for blob in blobs:
        try:
            call = json.loads(blob)
        except json.JSONDecodeError:
            continue
        if not isinstance(call, dict) or call.get("name") not in known:
            continue
        args = call.get("arguments", call.get("parameters", {}))
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(args)},
            }
        )
    return calls or None


def tools_prompt(tools: list[dict[str, Any]]) -> str:
    """A system note describing the tools, for chat templates that do not render `tools` themselves."""
    listed = "\n".join(json.dumps(t["function"]) for t in tools)
    return (
        "You may call these tools. To call one, answer with "
        '<tool_call>{"name": NAME, "arguments": {...}}</tool_call>.\n' + listed
    )


# --------------------------------------------------------------------------- per row (replica side)
_TOKENIZERS: dict[int, Any] = {}
_TOKENIZERS_LOCK = threading.Lock()


def ll_tokenizer(tokenizer: Any) -> Any:
    """llguidance's view of a fast Hugging Face tokenizer (built once per tokenizer: ~1 s for 50k tokens)."""
    key = id(tokenizer)
    with _TOKENIZERS_LOCK:
        if key not in _TOKENIZERS:
            import llguidance.hf

            _TOKENIZERS[key] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer))
        return _TOKENIZERS[key]


class GrammarConstraint:
    """One row's grammar state (serving.types.TokenConstraint), over llguidance's LLMatcher."""

    def __init__(self, tokenizer: Any, grammar: str) -> None:
        from llguidance import LLMatcher

        self.matcher = LLMatcher(ll_tokenizer(tokenizer), grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"the grammar cannot be used: {self.matcher.get_error()}")
        self.n_tokens = len(tokenizer)

    def allowed(self, vocab_size: int) -> torch.Tensor | None:
        import torch

        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        bits = np.unpackbits(words, bitorder="little")[: min(self.n_tokens, vocab_size)]
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[: bits.size] = torch.from_numpy(bits.astype(bool))
        if not bool(mask.any()):  # an error state: let the row end rather than sample from nothing
            return None
        return mask

    def advance(self, token_id: int) -> None:
        self.matcher.consume_token(token_id)

    def is_terminated(self) -> bool:
        return self.matcher.is_stopped() or self.matcher.is_error()
