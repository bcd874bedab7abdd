"""Reading an adapter for serving: a run directory (spec.yaml + adapter/) or an adapter directory
(adapter_config.json + adapter_model.safetensors [+ fulcrum.json]) -> checked against the served base ->
the per-kind tensors the engine puts into a slot.

A wrong base is refused with a 400 that names both bases, before a single request runs: by the manifest
when there is one (or the run's spec.yaml), and always by module names and tensor shapes (an adapter whose
modules the base lacks would otherwise serve the base's output unnoticed, as vLLM does).
"""

from __future__ import annotations

import contextlib
import json
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from serving.types import AdapterError
from trainers.errors import FulcrumError
from trainers.manifest import MANIFEST_FILE, describe_base, parse_manifest, same_base

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
# peft's saved keys start with this; what follows is the module path in the base causal LM.
PEFT_PREFIX = "base_model.model."
# Methods applied through stacked slots in the shared forward (the rest prepend virtual tokens).
SLOT_METHODS = frozenset({"lora", "qlora", "dora", "ia3", "adapter"})
PROMPT_METHODS = frozenset({"prefix", "prompt", "ptuning", "ptuning_v2"})


@dataclass
class LoraModule:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float
    magnitude: torch.Tensor | None = None  # DoRA: [out]


@dataclass
class LoadedAdapter:
    """One adapter, read and checked, ready for a slot (or, prompt-style, for a row's prefill)."""

    path: str
    method: str  # lora, qlora, dora, ia3, adapter, prefix, prompt, ptuning, ptuning_v2
    manifest: dict[str, Any] | None
    chat_template: str | None
    lora: dict[str, LoraModule] = field(default_factory=dict)  # module name -> weights
    ia3_out: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> [out]
    ia3_in: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> [in]
    bottleneck: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # sub-block -> tensors
    bottleneck_scaling: float = 1.0
    bottleneck_act: str = "silu"
    prompt_embeds: torch.Tensor | None = None  # [1, n_virtual, hidden] (prompt, ptuning)
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer [1, heads, n_virtual, dim]

    @property
    def num_virtual(self) -> int:
        if self.prompt_embeds is not None:
            return self.prompt_embeds.shape[1]
        if self.prefix_kv is not None:
            return self.prefix_kv[0][0].shape[2]
        return 0


def resolve_adapter_dir(path: str) -> tuple[Path, Path | None]:
    """(adapter directory, run directory or None) for a run directory or an adapter directory."""
    p = Path(path)
    if not p.is_dir():
        raise AdapterError(
            f"adapter path {path}: no such directory (give a run directory or an adapter directory)"
        )
    if (p / CONFIG_FILE).is_file():
        run = p.parent if (p.parent / "spec.yaml").is_file() else None
        return p, run
    if (p / "spec.yaml").is_file():
        if (p / "adapter" / CONFIG_FILE).is_file():
            return p / "adapter", p
        if (p / "model").is_dir():
            raise AdapterError(
                f"{path}: this run trained the full model (model/); serve it as the base "
                f"(`fulcrum serve --base {p / 'model'}`), not as an adapter"
            )
        raise AdapterError(f"{path}: run directory without adapter/ (the run did not finish)")
    raise AdapterError(
        f"{path}: neither a run directory (spec.yaml) nor an adapter directory ({CONFIG_FILE})"
    )


# The files of an adapter directory the server reads (a run directory adds its spec.yaml).
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE, "tokenizer_config.json")


def check_within_roots(path: str, roots: list[str]) -> None:
    """Refuse (AdapterError 403) an adapter whose directory or any file the server reads from it resolves,
    symlinks followed, outside every local root in `roots` (URI roots are skipped here: a URI is copied to a
    local cache first, and that copy is what gets checked). No local root: nothing to check against."""
    local = [
        Path(r.removeprefix("file://")).resolve() for r in roots if "://" not in r or r.startswith("file://")
    ]
    if not local:
        return
    p = Path(path)
    candidates = [p, p / "spec.yaml", p / "adapter"]
    for folder in (p, p / "adapter"):
        candidates += [folder / name for name in ADAPTER_FILES]
    for candidate in candidates:
        if not (candidate.exists() or candidate.is_symlink()):
            continue
        resolved = candidate.resolve()
        if not any(resolved.is_relative_to(root) for root in local):
            shown = ", ".join(str(r) for r in local)
            raise AdapterError(
                f"adapter file {candidate} resolves to {resolved}, outside the adapter roots ({shown}); "
                "copy the adapter under a root, or add its folder with --adapter-root",
                403,
            )


def _read_manifest(adapter_dir: Path) -> dict[str, Any] | None:
    file = adapter_dir / MANIFEST_FILE
    if not file.is_file():
        return None
    try:
        return parse_manifest(file.read_text(), str(file))
    except FulcrumError as e:
        raise AdapterError(str(e)) from None


def _run_base(run_dir: Path | None) -> dict[str, Any] | None:
    """The base identity from a run's spec.yaml (for runs written before manifests existed)."""
    if run_dir is None:
        return None
    try:
        import yaml

        from trainers.manifest import base_identity
        from trainers.spec import ModelSpec

        raw = yaml.safe_load((run_dir / "spec.yaml").read_text()) or {}
        return base_identity(ModelSpec(**raw["model"]))
    except Exception:  # an unreadable spec leaves the tensor-shape check to decide
        return None


def _kind(config: Any) -> str:
    """The method family by the peft type (the manifest may say more: qlora, ptuning_v2)."""
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    return kind_of(peft_type, bool(getattr(config, "use_dora", False)))


def kind_of(peft_type: str, use_dora: bool = False) -> str:
    """The served method family for a peft type (as adapter_config.json names it)."""
    if peft_type == "LORA":
        return "dora" if use_dora else "lora"
    by_type = {
        "IA3": "ia3",
        "BOTTLENECK": "adapter",
        "PREFIX_TUNING": "prefix",
        "PROMPT_TUNING": "prompt",
        "P_TUNING": "ptuning",
    }
    if peft_type not in by_type:
        raise AdapterError(
            f"adapter type {peft_type} is not served "
            "(served: lora, qlora, dora, ia3, adapter, prefix, prompt, ptuning, ptuning_v2)"
        )
    return by_type[peft_type]


def peft_lora_scalings(config: Any, shapes: dict[str, tuple[int, int, bool]]) -> dict[str, tuple[int, float]]:
    """(rank, scaling) per module, as peft itself computes them: peft injects its own LoRA layers into a
    skeleton holding only these linear modules (same names, on the meta device: nothing is allocated) and
    each layer's `r` and `scaling` are read back. So regex `rank_pattern`/`alpha_pattern` keys, rsLoRA and
    whatever peft adds later mean here exactly what they mean in peft; none of its matching is copied.
    `shapes`: module name -> (in_features, out_features, has_bias)."""
    import copy

    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    root = nn.Module()
    for name, (fan_in, fan_out, bias) in shapes.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Linear(fan_in, fan_out, bias=bias, device="meta"))
    # Only the scaling is wanted: no DoRA norms, no initialization (both would compute on meta tensors).
    config = copy.deepcopy(config)
    config.use_dora, config.init_lora_weights, config.inference_mode = False, False, True
    injected = inject_adapter_in_model(config, root, adapter_name="serve")
    return {
        name: (int(module.r["serve"]), float(module.scaling["serve"]))
        for name, module in injected.named_modules()
        if isinstance(module, LoraLayer) and "serve" in module.scaling
    }


class _BaseMismatch:
    """Collects the first shape/name mismatch and raises it as a 400 naming both bases."""

    def __init__(self, modules: dict[str, nn.Module], adapter_base: str, served_base: str, path: str) -> None:
        self.modules = modules
        self.adapter_base = adapter_base
        self.served_base = served_base
        self.path = path

    def fail(self, why: str) -> AdapterError:
        return AdapterError(
            f"adapter {self.path} was trained for base {self.adapter_base}, but this server runs "
            f"{self.served_base}: {why}. Serve it with its own base, or register an adapter trained on "
            f"{self.served_base}",
            400,
        )

    def module(self, name: str) -> nn.Module:
        module = self.modules.get(name)
        if module is None:
            raise self.fail(f"the base has no module `{name}`")
        return getattr(module, "base_layer", module)

    def linear(self, name: str, in_features: int | None, out_features: int | None) -> nn.Linear:
        module = self.module(name)
        if not isinstance(module, nn.Linear):
            raise AdapterError(
                f"adapter {self.path}: module `{name}` is a {type(module).__name__}, not a linear layer; "
                "only adapters on linear layers are served"
            )
        if in_features is not None and in_features != module.in_features:
            raise self.fail(
                f"`{name}` takes {module.in_features} inputs in the base, the adapter expects {in_features}"
            )
        if out_features is not None and out_features != module.out_features:
            raise self.fail(
                f"`{name}` gives {module.out_features} outputs in the base, "
                f"the adapter expects {out_features}"
            )
        return module


def read_adapter(
    path: str,
    model: nn.Module,
    base_identity: dict[str, Any],
    modules: dict[str, nn.Module] | None = None,
    device_lock: AbstractContextManager[Any] | None = None,
) -> LoadedAdapter:
    """Read and check an adapter against the served base `model` (`modules`: its modules by their original
    names, before the engine wrapped any); raises AdapterError (400) on a mismatch. `device_lock` is held
    while a prompt-style adapter's virtual tokens are computed through the served base (never during a
    decode step); the rest runs without it."""
    from peft import PeftConfig

    import trainers.tuners  # noqa: F401  (registers the bottleneck adapter's config with peft)

    adapter_dir, run_dir = resolve_adapter_dir(path)
    manifest = _read_manifest(adapter_dir)
    served = describe_base(base_identity)
    claimed = manifest["base"] if manifest is not None else _run_base(run_dir)
    if claimed is not None and not same_base(claimed, base_identity):
        raise AdapterError(
            f"adapter {path} was trained for base {describe_base(claimed)}, but this server runs {served}; "
            "serve it with its own base, or register an adapter trained on this one",
            400,
        )
    try:
        config = PeftConfig.from_pretrained(str(adapter_dir))
    except Exception as e:
        raise AdapterError(f"{adapter_dir / CONFIG_FILE}: not a readable peft adapter config ({e})") from None
    kind = _kind(config)
    method = str((manifest or {}).get("method") or kind)
    if not (adapter_dir / WEIGHTS_FILE).is_file():
        raise AdapterError(f"{adapter_dir}: no {WEIGHTS_FILE} (save adapters with safetensors)")
    weights = _load_weights(adapter_dir / WEIGHTS_FILE)
    adapter_base = (
        describe_base(claimed)
        if claimed is not None
        else str(config.base_model_name_or_path or "an unknown base")
    )
    check = _BaseMismatch(
        modules if modules is not None else dict(model.named_modules()), adapter_base, served, path
    )
    loaded = LoadedAdapter(
        path=str(path),
        method=method,
        manifest=manifest,
        chat_template=(manifest or {}).get("chat_template") or _tokenizer_template(adapter_dir),
    )
    if getattr(config, "modules_to_save", None):
        raise AdapterError(
            f"adapter {path}: modules_to_save ({', '.join(config.modules_to_save)}) are whole trained "
            "copies of base modules; they cannot be served per row. Merge the adapter "
            "(`fulcrum export --merge`) and serve the result as a base"
        )
    if kind in PROMPT_METHODS:
        with device_lock if device_lock is not None else contextlib.nullcontext():
            _read_prompt(loaded, adapter_dir, model, weights, config, check)
    elif kind == "adapter":
        _read_bottleneck(loaded, weights, config, check, model)
    elif kind == "ia3":
        _read_ia3(loaded, weights, config, check)
    else:
        _read_lora(loaded, weights, config, check)
    return loaded


def _load_weights(file: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors; a truncated or corrupt file is the adapter's fault (400 naming the file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(
            f"{file}: not a readable safetensors file ({(str(e) or type(e).__name__).splitlines()[0]}); "
            "it may be truncated: copy the adapter again",
            400,
        ) from None


def _tokenizer_template(adapter_dir: Path) -> str | None:
    file = adapter_dir / "tokenizer_config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text()).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
        return None


def _split_key(key: str, path: str) -> tuple[str, str]:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> (module, 'lora_A.weight')."""
    if not key.startswith(PEFT_PREFIX):
        raise AdapterError(f"adapter {path}: unexpected tensor `{key}` (not a peft adapter of a causal LM)")
    rest = key[len(PEFT_PREFIX) :]
    for marker in (".lora_A.", ".lora_B.", ".lora_magnitude_vector", ".ia3_l", ".bottleneck_"):
        at = rest.find(marker)
        if at >= 0:
            return rest[:at], rest[at + 1 :]
    raise AdapterError(f"adapter {path}: tensor `{key}` is of a kind the server does not know")


def _read_lora(
    loaded: LoadedAdapter, weights: dict[str, torch.Tensor], config: Any, check: _BaseMismatch
) -> None:
    if getattr(config, "lora_bias", False):
        raise AdapterError(f"adapter {loaded.path}: LoRA with lora_bias=True is not served")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        module, what = _split_key(key, loaded.path)
        parts.setdefault(module, {})[what.split(".")[0]] = tensor
    shapes = {}
    for module, p in parts.items():
        if "lora_A" not in p or "lora_B" not in p:
            raise AdapterError(f"adapter {loaded.path}: module `{module}` lacks lora_A or lora_B")
        a, b = p["lora_A"], p["lora_B"]
        if a.dim() != 2 or b.dim() != 2:
            raise AdapterError(
                f"adapter {loaded.path}: `{module}` is not a linear LoRA (embedding/conv LoRA is not served)"
            )
        linear = check.linear(module, a.shape[1], b.shape[0])
        shapes[module] = (linear.in_features, linear.out_features, linear.bias is not None)
    try:
        scalings = peft_lora_scalings(config, shapes)
    except Exception as e:  # peft refuses the config against these modules
        raise AdapterError(
            f"adapter {loaded.path}: peft cannot apply its {CONFIG_FILE} to the base's modules "
            f"({(str(e) or type(e).__name__).splitlines()[0]})"
        ) from None
    for module, p in parts.items():
        a, b = p["lora_A"], p["lora_B"]
        if module not in scalings:
            raise AdapterError(
                f"adapter {loaded.path}: has weights for `{module}`, which its {CONFIG_FILE} does not target"
            )
        rank, scaling = scalings[module]
        if rank != a.shape[0]:
            raise AdapterError(
                f"adapter {loaded.path}: `{module}` has rank {a.shape[0]} in {WEIGHTS_FILE} but {rank} "
                f"by its {CONFIG_FILE} (r / rank_pattern)"
            )
        magnitude = p.get("lora_magnitude_vector")
        if magnitude is not None:
            magnitude = magnitude.reshape(-1)
        loaded.lora[module] = LoraModule(a=a, b=b, scaling=scaling, magnitude=magnitude)
    if not loaded.lora:
        raise AdapterError(f"adapter {loaded.path}: holds no LoRA weights")


def _read_ia3(
    loaded: LoadedAdapter, weights: dict[str, torch.Tensor], config: Any, check: _BaseMismatch
) -> None:
    for key, tensor in weights.items():
        module, _ = _split_key(key, loaded.path)
        # peft stores [1, in] for feed-forward modules (scales the input), [out, 1] for the others.
        if tensor.shape[0] == 1 and tensor.dim() == 2 and tensor.shape[1] != 1:
            check.linear(module, tensor.shape[1], None)
            loaded.ia3_in[module] = tensor.reshape(-1)
        else:
            check.linear(module, None, tensor.shape[0])
            loaded.ia3_out[module] = tensor.reshape(-1)
    if not (loaded.ia3_in or loaded.ia3_out):
        raise AdapterError(f"adapter {loaded.path}: holds no IA3 vectors")


def _read_bottleneck(
    loaded: LoadedAdapter,
    weights: dict[str, torch.Tensor],
    config: Any,
    check: _BaseMismatch,
    model: nn.Module,
) -> None:
    hidden = model.config.get_text_config().hidden_size
    names = {"bottleneck_down.weight": "down_w", "bottleneck_down.bias": "down_b"}
    names |= {"bottleneck_up.weight": "up_w", "bottleneck_up.bias": "up_b"}
    for key, tensor in weights.items():
        module, what = _split_key(key, loaded.path)
        if what not in names:
            raise AdapterError(f"adapter {loaded.path}: unexpected bottleneck tensor `{key}`")
        loaded.bottleneck.setdefault(module, {})[names[what]] = tensor
    for module, t in loaded.bottleneck.items():
        check.module(module)
        if set(t) != set(names.values()):
            raise AdapterError(f"adapter {loaded.path}: bottleneck on `{module}` lacks some of its weights")
        if t["down_w"].shape[1] != hidden:
            raise check.fail(f"the adapter's hidden size is {t['down_w'].shape[1]}, the base's {hidden}")
    loaded.bottleneck_scaling = float(config.scaling)
    loaded.bottleneck_act = str(config.non_linearity)
    if not loaded.bottleneck:
        raise AdapterError(f"adapter {loaded.path}: holds no bottleneck weights")


def _read_prompt(
    loaded: LoadedAdapter,
    adapter_dir: Path,
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    config: Any,
    check: _BaseMismatch,
) -> None:
    """Virtual tokens: computed once here, through peft's own prompt encoder, so they equal exactly what
    peft's `generate` feeds the model. (Prompt learning does not touch the base's modules, so wrapping the
    served base in a PeftModel for a moment changes nothing in it.)"""
    from peft import PeftModel

    text = model.config.get_text_config()
    token_dim = getattr(config, "token_dim", None)
    if token_dim and config.peft_type != "PREFIX_TUNING" and token_dim != text.hidden_size:
        raise check.fail(
            f"the adapter's virtual tokens are {token_dim}-dim, the base's hidden size is {text.hidden_size}"
        )
    if config.peft_type == "PREFIX_TUNING" and getattr(config, "num_layers", None) != text.num_hidden_layers:
        raise check.fail(
            f"the adapter prefixes {config.num_layers} layers, the base has {text.num_hidden_layers}"
        )
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except Exception as e:
        raise check.fail(f"peft cannot attach it ({str(e).splitlines()[0]})") from None
    with torch.no_grad():
        prompt = peft_model.get_prompt(batch_size=1)
    if config.peft_type == "PREFIX_TUNING":
        if hasattr(prompt, "layers"):
            loaded.prefix_kv = [
                (layer.keys.detach().clone(), layer.values.detach().clone()) for layer in prompt.layers
            ]
        else:
            loaded.prefix_kv = [(k.detach().clone(), v.detach().clone()) for k, v in prompt]
    else:
        loaded.prompt_embeds = prompt.detach().clone()
    del peft_model
