"""The batching engine on a tiny Llama: per-row adapters of every kind in one batch equal plain peft,
continuous batching, hot swap, eviction, wrong bases. No Ray needed: the engine is plain PyTorch."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from serving.engine import BatchEngine, load_base
from serving.types import AdapterError, SamplingParams, TokenEvent
from tests.helpers import TINY_LLAMA
from trainers.manifest import FORMAT, MANIFEST_FILE, base_identity
from trainers.spec import ModelSpec

NEW_TOKENS = 12
METHOD_OF = {"lora4": "lora", "lora8": "lora", "adapter_silu": "adapter"}


def model_spec(**config: Any) -> ModelSpec:
    return ModelSpec(config={**TINY_LLAMA, **config}, tokenizer="bytes")


_BASES: dict[str, Any] = {}


def fresh_base(spec: ModelSpec) -> Any:
    """A fresh copy of the base (peft wraps it in place), loaded once per shape."""
    key = spec.model_dump_json()
    if key not in _BASES:
        _BASES[key] = load_base(spec, "cpu")[0]
    return copy.deepcopy(_BASES[key])


def _randomize(model: Any, seed: int) -> None:
    """Non-trivial adapter weights (peft starts LoRA's B, IA3's vectors and the bottleneck's up at
    no-ops): every trainable tensor gets noise, so each adapter really changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if "ia3_l" in name:
                p.copy_(torch.rand(p.shape, generator=gen) * 2.5 + 0.2)
            elif "magnitude" in name:
                p.mul_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def make_adapter(spec: ModelSpec, kind: str, out: Path, seed: int, manifest_base: dict | None = None) -> Path:
    from peft import (
        IA3Config,
        LoraConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
        get_peft_model,
    )

    from trainers.tuners import BottleneckConfig

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    configs = {
        "lora4": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        "lora8": LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"),
        "dora": LoraConfig(r=4, lora_alpha=4, target_modules=targets, use_dora=True, task_type="CAUSAL_LM"),
        "ia3": IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"],
            feedforward_modules=["down_proj"],
            task_type="CAUSAL_LM",
        ),
        "adapter": BottleneckConfig(bottleneck_size=8, non_linearity="relu", task_type="CAUSAL_LM"),
        "adapter_silu": BottleneckConfig(
            bottleneck_size=4, non_linearity="silu", scaling=0.5, task_type="CAUSAL_LM"
        ),
        "prompt": PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
        "prefix": PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
        "ptuning": PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=16, task_type="CAUSAL_LM"),
    }
    torch.manual_seed(seed)
    model = get_peft_model(fresh_base(spec), configs[kind])
    _randomize(model, seed)
    model.save_pretrained(out)
    if manifest_base is not None:
        (out / MANIFEST_FILE).write_text(
            json.dumps(
                {
                    "format": FORMAT,
                    "kind": "adapter",
                    "method": METHOD_OF.get(kind, kind),
                    "base": manifest_base,
                }
            )
        )
    return out


def peft_generate(
    spec: ModelSpec, adapter: Path | None, prompt: list[int], eos: int, max_new_tokens: int = NEW_TOKENS
) -> list[int]:
    """Greedy tokens of plain transformers + peft for one adapter alone: the argmax of peft's own forward
    (the one training uses) over the whole sequence at each step, with no KV cache. Not peft's `generate`:
    its cache plumbing breaks with some transformers releases (5.24 re-injects prompt tuning's virtual
    tokens at every step and drops prefix tuning's prefix; docs/dependencies.md), and this reference
    must not move with it."""
    from peft import PeftModel

    import trainers.tuners  # noqa: F401

    model = fresh_base(spec)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            x = torch.tensor([ids])
            logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits
            ids.append(int(logits[0, -1].argmax()))
            if ids[-1] == eos:
                break
    return ids[len(prompt) :]


async def collect(
    engine: BatchEngine, prompt: list[int], adapter: str | None, **params: Any
) -> list[TokenEvent]:
    return [ev async for ev in engine.generate(prompt, adapter, SamplingParams(**params))]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    spec = model_spec()
    root = tmp_path_factory.mktemp("adapters")
    ident = base_identity(spec)
    kinds = ["lora4", "lora8", "dora", "ia3", "adapter", "adapter_silu", "prompt", "prefix", "ptuning"]
    paths = {
        k: make_adapter(spec, k, root / k, seed=i, manifest_base=ident if i % 2 else None)
        for i, k in enumerate(kinds)
    }
    return {"spec": spec, "paths": paths, "root": root}


def new_engine(spec: ModelSpec, **kw: Any) -> BatchEngine:
    model, tokenizer = load_base(spec, "cpu")
    args = {"max_adapters": 16, "max_batch_rows": 16, "context_length": 128, **kw}
    return BatchEngine(model, tokenizer, base_identity=base_identity(spec), **args)


def prompts(tokenizer: Any, n: int) -> list[list[int]]:
    texts = ["the cat sat", "a dog ran to the park", "birds", "tall green trees and the mat", "on a"]
    return [tokenizer.encode(texts[i % len(texts)] + " " * (i // len(texts))) for i in range(n)]


@pytest.mark.parametrize("static", [True, False], ids=["static-cache", "transformers-cache"])
def test_mixed_batch_equals_peft_per_adapter(setup: dict[str, Any], static: bool) -> None:
    spec, paths = setup["spec"], setup["paths"]
    engine = new_engine(spec, static_decode=static)
    assert engine.decode_mode == ("static" if static else "dynamic")  # no GPU here: no CUDA graphs
    for aid, path in paths.items():
        info = engine.add_adapter(aid, str(path))
        assert info.method == METHOD_OF.get(aid, aid)
    ids = [None, *paths]
    batch = prompts(engine.tokenizer, len(ids))
    eos = engine.tokenizer.eos_token_id

    async def run_all() -> list[list[TokenEvent]]:
        return await asyncio.gather(
            *(
                collect(engine, p, a, max_tokens=NEW_TOKENS, temperature=0)
                for p, a in zip(batch, ids, strict=True)
            )
        )

    results = asyncio.run(run_all())
    assert engine.steps < NEW_TOKENS * 2  # the requests really shared decode steps
    changed = []
    for prompt, aid, events in zip(batch, ids, results, strict=True):
        got = [e.token_id for e in events]
        ref = peft_generate(spec, paths[aid] if aid else None, prompt, eos)
        assert got == ref, f"adapter {aid}: engine {got} != peft {ref}"
        assert events[-1].finish_reason in ("length", "stop")
        assert all(e.finish_reason is None for e in events[:-1])
        if aid is not None and ref != peft_generate(spec, None, prompt, eos):
            changed.append(aid)
    # The adapters are not no-ops: each answers differently from the base on its prompt.
    assert len(changed) >= len(paths) - 1, changed


def test_static_cache_grows_and_reuses_rows(setup: dict[str, Any]) -> None:
    """Long prompts make the per-row cache grow past its first length bucket; more requests than batch
    rows make finished rows' cache rows be taken again. Every answer still equals peft's."""
    spec, paths = setup["spec"], setup["paths"]
    engine = new_engine(spec, max_batch_rows=3, context_length=256)
    engine.add_adapter("lora8", str(paths["lora8"]))
    engine.add_adapter("dora", str(paths["dora"]))
    words = "the cat sat on a mat and the dog ran to the park "
    batch = [engine.tokenizer.encode(words * 5)[: 40 + 30 * i] for i in range(6)]
    ids = ["lora8", "dora", None, "dora", "lora8", None]
    lengths = [4, 9, 6, 12, 5, 8]
    eos = engine.tokenizer.eos_token_id

    async def run_all() -> list[list[TokenEvent]]:
        return await asyncio.gather(
            *(
                collect(engine, p, a, max_tokens=n, temperature=0)
                for p, a, n in zip(batch, ids, lengths, strict=True)
            )
        )

    results = asyncio.run(run_all())
    assert engine._decoder.len_cap == 256 and engine._decoder.rows_cap == 3  # grew from 64 columns
    for prompt, aid, n, events in zip(batch, ids, lengths, results, strict=True):
        ref = peft_generate(spec, paths[aid] if aid else None, prompt, eos, max_new_tokens=n)
        assert [e.token_id for e in events] == ref, f"adapter {aid}, prompt of {len(prompt)} tokens"


def test_short_request_overtakes_long_one(setup: dict[str, Any]) -> None:
    engine = new_engine(setup["spec"])
    engine.add_adapter("lora8", str(setup["paths"]["lora8"]))
    finished: list[str] = []
    prompt = prompts(engine.tokenizer, 1)[0]

    async def run(name: str, adapter: str | None, n: int, started: asyncio.Event | None = None) -> None:
        async for ev in engine.generate(prompt, adapter, SamplingParams(max_tokens=n, temperature=0)):
            if started is not None:
                started.set()
            if ev.finish_reason:
                finished.append(name)

    async def main() -> None:
        started = asyncio.Event()
        long = asyncio.create_task(run("long", "lora8", 80, started))
        await started.wait()  # the long one is decoding
        await run("short", None, 3)
        assert not long.done()
        await long

    asyncio.run(main())
    assert finished == ["short", "long"]


def test_replace_keeps_running_request_on_old_version(setup: dict[str, Any]) -> None:
    spec, paths = setup["spec"], setup["paths"]
    engine = new_engine(spec)
    engine.add_adapter("x", str(paths["lora4"]))
    prompt = prompts(engine.tokenizer, 3)[2]
    eos = engine.tokenizer.eos_token_id
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)

    async def main() -> tuple[list[int], list[int]]:
        old = engine.generate(prompt, "x", params)
        first = await anext(old)  # decoding on the old version
        engine.add_adapter("x", str(paths["dora"]))  # replace while it runs
        new = asyncio.create_task(collect(engine, prompt, "x", max_tokens=NEW_TOKENS, temperature=0))
        rest = [ev async for ev in old]
        return [first.token_id] + [e.token_id for e in rest], [e.token_id for e in await new]

    old_tokens, new_tokens = asyncio.run(main())
    assert old_tokens == peft_generate(spec, paths["lora4"], prompt, eos)
    assert new_tokens == peft_generate(spec, paths["dora"], prompt, eos)
    assert engine.adapters()["x"].path == str(paths["dora"])
    assert engine.stats()["slots_used"] == 1  # the old version's slot was freed when its request ended


def test_lru_eviction_when_slots_are_full(setup: dict[str, Any]) -> None:
    paths = setup["paths"]
    engine = new_engine(setup["spec"], max_adapters=2)
    prompt = prompts(engine.tokenizer, 1)[0]
    engine.add_adapter("a", str(paths["lora4"]))
    engine.add_adapter("b", str(paths["ia3"]))
    asyncio.run(collect(engine, prompt, "a", max_tokens=2, temperature=0))  # b is now least recently used
    engine.add_adapter("c", str(paths["adapter"]))
    assert set(engine.adapters()) == {"a", "c"}
    with pytest.raises(AdapterError) as e:
        engine.generate(prompt, "b", SamplingParams())
    assert e.value.status == 404 and "a, c" in str(e.value)

    # Busy adapters are never evicted: with both pinned by running requests there is no room.
    async def busy() -> None:
        runs = [engine.generate(prompt, aid, SamplingParams(max_tokens=30, temperature=0)) for aid in "ac"]
        firsts = [await anext(r) for r in runs]
        assert all(f.finish_reason is None for f in firsts)
        with pytest.raises(AdapterError) as full:
            engine.add_adapter("d", str(paths["lora8"]))
        assert full.value.status == 503
        for r in runs:
            async for _ in r:
                pass

    asyncio.run(busy())
    engine.add_adapter("d", str(paths["lora8"]))
    assert len(engine.adapters()) == 2 and engine.load_seconds("d") < 5


def test_wrong_base_is_refused_naming_both_bases(setup: dict[str, Any], tmp_path: Path) -> None:
    spec = setup["spec"]
    engine = new_engine(spec)
    served = "inline llama config (hidden_size=64, num_hidden_layers=2"
    # By the manifest: an adapter that says it belongs to another base.
    other = {"base": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": None}
    path = make_adapter(spec, "lora4", tmp_path / "manifest", seed=1, manifest_base=other)
    with pytest.raises(AdapterError) as e:
        engine.add_adapter("m", str(path))
    assert e.value.status == 400 and "SmolLM2-135M-Instruct" in str(e.value) and served in str(e.value)
    # By tensor shapes (no manifest): a LoRA for a wider model, and one for a deeper model.
    wide = make_adapter(model_spec(hidden_size=32, intermediate_size=64), "lora8", tmp_path / "wide", seed=2)
    with pytest.raises(AdapterError) as e:
        engine.inspect_adapter("w", str(wide))
    assert e.value.status == 400 and served in str(e.value) and "inputs in the base" in str(e.value)
    deep = make_adapter(model_spec(num_hidden_layers=3), "lora4", tmp_path / "deep", seed=3)
    with pytest.raises(AdapterError) as e:
        engine.add_adapter("d", str(deep))
    assert "no module `model.layers.2.self_attn.q_proj`" in str(e.value) and served in str(e.value)
    # A run directory of a full fine-tune is a base, not an adapter.
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "spec.yaml").write_text("name: x\n")
    with pytest.raises(AdapterError, match="serve it as the base"):
        engine.add_adapter("r", str(tmp_path / "run"))
    assert engine.adapters() == {}


def test_stop_strings_sampling_and_context_limit(setup: dict[str, Any]) -> None:
    engine = new_engine(setup["spec"], context_length=25)
    prompt = prompts(engine.tokenizer, 2)[1]  # 21 tokens: room for 4 more
    assert len(prompt) == 21

    async def main() -> None:
        full = await collect(engine, prompt, None, max_tokens=50, temperature=0)
        assert [e.finish_reason for e in full][-1] == "length" and len(full) == 4
        text = "".join(e.text for e in full)
        stop = text[1:3]
        cut = await collect(engine, prompt, None, max_tokens=50, temperature=0, stop=[stop])
        assert cut[-1].finish_reason == "stop" and "".join(e.text for e in cut) == text[: text.find(stop)]
        params = {"max_tokens": 4, "temperature": 1.0, "top_p": 0.9}
        a, b, _ = await asyncio.gather(
            collect(engine, prompt, None, seed=7, **params),
            collect(engine, prompt, None, seed=7, **params),
            collect(engine, prompt[:5], None, seed=8, **params),
        )
        assert [e.token_id for e in a] == [e.token_id for e in b]

    asyncio.run(main())
    with pytest.raises(AdapterError) as e:
        engine.generate(prompt + prompt, None, SamplingParams())
    assert e.value.status == 400 and "context length is 25" in str(e.value)
    with pytest.raises(AdapterError, match="token ids must lie in"):
        engine.generate([1, 10**6], None, SamplingParams())


def test_run_directory_and_cancelled_stream(setup: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    import yaml

    spec, paths = setup["spec"], setup["paths"]
    engine = new_engine(spec)
    # A run directory (spec.yaml + adapter/) without a manifest: its spec's model section names the base.
    for name, model in (("same", spec.model_dump(exclude_none=True)), ("other", {"base": "org/other-7b"})):
        shutil.copytree(paths["lora4"], tmp_path / name / "adapter")  # no manifest
        (tmp_path / name / "spec.yaml").write_text(yaml.safe_dump({"name": name, "model": model}))
    assert engine.add_adapter("run", str(tmp_path / "same")).method == "lora"
    with pytest.raises(AdapterError, match=r"org/other-7b.*this server runs inline llama"):
        engine.add_adapter("bad", str(tmp_path / "other"))

    async def main() -> None:
        stream = engine.generate(
            prompts(engine.tokenizer, 1)[0], "run", SamplingParams(max_tokens=60, temperature=0)
        )
        await anext(stream)
        await stream.aclose()  # the client went away: its row leaves at the next step
        short = await collect(engine, [65, 66], "run", max_tokens=3, temperature=0)
        assert len(short) == 3

    asyncio.run(main())
    assert engine.stats()["active_rows"] == 0 and engine._entries["run"].refs == 0
