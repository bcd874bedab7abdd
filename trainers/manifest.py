"""The artifact manifest: `fulcrum.json` beside every adapter (and full model) a run writes.

It says what the weights belong to, so that a server (serving/) can refuse an adapter trained on another
base before it produces nonsense: the base by the identity the user gave (hub id + revision, a path or
URI, or an inline config; never a driver cache path), quantization, dtype, method and peft type, and the
tokenizer and chat template used in training.
"""

from __future__ import annotations

import json
import time
from typing import Any

MANIFEST_FILE = "fulcrum.json"
FORMAT = "fulcrum-artifact/1"


def base_identity(model_spec: Any) -> dict[str, Any]:
    """What names a base: `base` (hub id, path or URI as given) + revision, or the inline config +
    tokenizer. Two model sections with equal identities load the same weights."""
    if model_spec.base is not None:
        return {"base": model_spec.base, "revision": model_spec.revision}
    return {"config": model_spec.config, "tokenizer": model_spec.tokenizer or "bytes"}


def describe_base(identity: dict[str, Any]) -> str:
    """A short human name for a base identity (for error messages)."""
    if identity.get("base") is not None:
        rev = identity.get("revision")
        return f"{identity['base']}{'@' + rev if rev else ''}"
    config = identity.get("config") or {}
    shape = ", ".join(
        f"{k}={config[k]}" for k in ("hidden_size", "num_hidden_layers", "vocab_size") if k in config
    )
    return f"inline {config.get('model_type', '?')} config ({shape})"


def same_base(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return _canonical(a) == _canonical(b)


def _canonical(identity: dict[str, Any]) -> str:
    ident = {k: v for k, v in identity.items() if v is not None}
    return json.dumps(ident, sort_keys=True)


def build_manifest(
    spec: Any, *, kind: str, peft_type: str | None, dtype: str, tokenizer: Any
) -> dict[str, Any]:
    """The manifest of a run's artifact (`kind`: adapter or model)."""
    return {
        "format": FORMAT,
        "kind": kind,
        "name": spec.name,
        "method": spec.method.kind,
        "peft_type": peft_type,
        "objective": spec.objective.kind,
        "base": base_identity(spec.model),
        "quantization": spec.quantization,
        "dtype": dtype,
        "trust_remote_code": spec.model.trust_remote_code,
        # "artifact": the tokenizer files sit beside the weights (training added a pad token or a chat
        # template, or the base has none of its own); "base": load the base's tokenizer.
        "tokenizer": "artifact" if getattr(tokenizer, "fulcrum_changed", False) else "base",
        "chat_template": tokenizer.chat_template,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def parse_manifest(text: str, where: str) -> dict[str, Any]:
    """Parse manifest text; a manifest of another format is an error naming `where`."""
    from trainers.errors import FulcrumError

    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise FulcrumError(f"{where}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FulcrumError(f"{where}: not a fulcrum artifact manifest (expected format {FORMAT})")
    return manifest
