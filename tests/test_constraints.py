"""The pinned dependency set: every direct dependency is bounded in pyproject.toml and pinned in
constraints.txt inside those bounds, and the pinned transformers + peft pair generates what peft's own
forward says for prompt-style adapters (`fulcrum eval` answers with peft's `generate`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.serving.test_engine import NEW_TOKENS, fresh_base, make_adapter, model_spec, peft_generate

ROOT = Path(__file__).resolve().parents[1]
UNPINNED = {"torch"}  # tools/setup.sh installs it first, at its own pin (CPU or CUDA build)


def direct_requirements() -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs.extend(extra)
    return [Requirement(r) for r in reqs]


def constraints() -> dict[str, str]:
    pins: dict[str, str] = {}
    for n, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"constraints.txt line {n}: {line!r} is not `name==version`"
        key = canonicalize_name(name)
        assert key not in pins, f"constraints.txt line {n}: {name} is pinned twice"
        pins[key] = version
    return pins


def test_every_direct_dependency_is_bounded_and_pinned_inside_its_bounds() -> None:
    pins = constraints()
    for req in direct_requirements():
        assert any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier), (
            f"pyproject.toml: {req} has no upper bound; add the next untested release line as one"
        )
        key = canonicalize_name(req.name)
        if key in UNPINNED:
            assert key not in pins, f"constraints.txt pins {req.name}: tools/setup.sh installs it on its own"
            assert "2.13.0" in req.specifier, f"{req}: tools/setup.sh installs torch 2.13.0"
            continue
        assert key in pins, f"constraints.txt has no pin for {req.name}: regenerate it with tools/lock.sh"
        assert pins[key] in req.specifier, (
            f"constraints.txt pins {req.name}=={pins[key]}, outside pyproject.toml's `{req}`"
        )
    # Parts of a CUDA torch that a CPU install lacks; pinning them would break one of the two.
    cuda = sorted(k for k in pins if k.startswith("nvidia-") or k in ("triton", "fulcrum"))
    assert not cuda, f"constraints.txt must not pin {cuda} (tools/lock.sh leaves them out)"


@pytest.mark.parametrize("kind", ["prompt", "prefix", "ptuning"])
def test_peft_generate_equals_its_forward_for_prompt_style_adapters(kind: str, tmp_path: Path) -> None:
    """transformers 5.24 renamed generate's cache argument and peft 0.21.2's generate broke for these
    methods (docs/dependencies.md). This catches the next such pair before `fulcrum eval` answers wrong."""
    import peft
    import transformers
    from peft import PeftModel

    spec = model_spec()
    path = make_adapter(spec, kind, tmp_path / kind, seed=5)
    prompt = list(b"the cat sat on")
    eos = 0  # both stop there if it comes
    want = peft_generate(spec, path, prompt, eos)
    model = PeftModel.from_pretrained(fresh_base(spec), str(path))
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
            use_cache=True, eos_token_id=eos, pad_token_id=eos,
        )  # fmt: skip
    got = out[0, len(prompt) :].tolist()
    assert got == want, (
        f"peft {peft.__version__} `generate` with transformers {transformers.__version__} gives {got} for a "
        f"{kind} adapter, its own forward {want}: keep transformers below this release in pyproject.toml "
        "until peft supports it (docs/dependencies.md)"
    )
