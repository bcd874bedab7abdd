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

from serving.decode import StaticDecoder
from serving.engine import BatchEngine, load_base
from serving.types import AdapterError, SamplingParams, TokenEvent
from tests.helpers import TINY_LLAMA
from trainers.manifest import FORMAT, MANIFEST_FILE, base_identity
from trainers.spec import ModelSpec

NEW_TOKENS = 12
METHOD_OF = {"lora4": "lora", "lora8": "lora", "lora_regex": "lora", "adapter_silu": "adapter"}


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
        # peft's regex keys: layer 0's q and v get alpha 64 (scaling 16), layer 1's v rank 2.
        "lora_regex": LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            alpha_pattern={r"layers\.0\.self_attn\.(q|v)_proj": 64},
            rank_pattern={r"layers\.1\.self_attn\.v_proj": 2},
            task_type="CAUSAL_LM",
        ),
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


def peft_logprobs(spec: ModelSpec, adapter: Path | None, ids: list[int]) -> torch.Tensor:
    """peft's own log-softmax over a whole sequence, one forward, no cache: row i is the distribution of
    token i + 1 (prompt tuning's virtual positions dropped)."""
    from peft import PeftModel

    import trainers.tuners  # noqa: F401

    model = fresh_base(spec)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    with torch.no_grad():
        x = torch.tensor([ids])
        logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0, -len(ids) :]
    return torch.log_softmax(logits.float(), dim=-1)


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


@pytest.mark.parametrize(
    "static,lora_mode,pipeline,compiled",
    [
        (True, "dense", False, False),
        (True, "gather", False, False),
        (True, "dense", True, False),
        (True, "dense", True, True),
        (False, "auto", False, False),
    ],
    ids=[
        "static-cache-dense-lora",
        "static-cache-gathered-lora",
        "one-step-ahead",
        "compiled-step",
        "transformers-cache",
    ],
)
def test_mixed_batch_equals_peft_per_adapter(
    setup: dict[str, Any], static: bool, lora_mode: str, pipeline: bool, compiled: bool
) -> None:
    spec, paths = setup["spec"], setup["paths"]
    engine = new_engine(spec, static_decode=static, compile_decode=compiled)
    engine.slot_state.lora_mode = lora_mode  # both ways of applying a mixed batch's adapters
    engine.pipeline = pipeline  # step t+1 launched before step t's tokens are emitted (GPUs do this)
    mode = "static" if static else "dynamic"  # no GPU here: no CUDA graphs
    assert engine.decode_mode == (f"{mode}, compiled" if compiled else mode)
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
    if static:  # q/k/v and gate/up ran as one GEMM each, their LoRA A stacks fused (serving/fused.py)
        decoder = engine._decoder
        assert isinstance(decoder, StaticDecoder)
        assert all(f.weight is not None for f in (*decoder.qkv, *decoder.gate_up))
        assert all(f._lora_of == [0, 1, 2] for f in decoder.qkv)
        assert all(f._lora_of == [0, 1] for f in decoder.gate_up)
    assert (engine.steps_ahead > NEW_TOKENS // 2) == pipeline, engine.steps_ahead
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


def test_static_cache_sized_at_start_and_reuses_rows(setup: dict[str, Any]) -> None:
    """Prompts of many lengths in a cache allocated at start-up; more requests than batch rows make
    finished rows' cache rows be taken again. Every answer still equals peft's."""
    spec, paths = setup["spec"], setup["paths"]
    engine = new_engine(spec, max_batch_rows=3, context_length=256)
    # The KV cache is sized once, at start-up: rows x context, never grown under load.
    assert engine._decoder.len_cap == 256 and engine._decoder.rows_cap == 3
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


def test_full_table_refuses_clearly_and_busy_versions_live_on(setup: dict[str, Any]) -> None:
    """No LRU in the engine (Serve's multiplex is the one LRU): a full table refuses with a 503 that says
    so; a removed adapter's running request finishes on its own version, and its slot is then reused."""
    spec, paths = setup["spec"], setup["paths"]
    engine = new_engine(spec, max_adapters=2)
    prompt = prompts(engine.tokenizer, 1)[0]
    eos = engine.tokenizer.eos_token_id
    engine.add_adapter("a", str(paths["lora4"]))
    engine.add_adapter("b", str(paths["ia3"]))
    with pytest.raises(AdapterError) as full:
        engine.add_adapter("c", str(paths["adapter"]))
    assert full.value.status == 503 and "maximum of 2 adapters (a, b)" in str(full.value)
    engine.add_adapter("b", str(paths["dora"]))  # replacing an id needs no room

    async def main() -> list[int]:
        run = engine.generate(prompt, "a", SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
        first = await anext(run)
        engine.remove_adapter("a")  # while its request runs
        with pytest.raises(AdapterError) as gone:
            engine.generate(prompt, "a", SamplingParams())
        assert gone.value.status == 404 and "known adapters: b" in str(gone.value)
        engine.add_adapter("c", str(paths["lora8"]))  # takes a spare slot: a's is still busy
        return [first.token_id] + [e.token_id async for e in run]

    assert asyncio.run(main()) == peft_generate(spec, paths["lora4"], prompt, eos)
    assert set(engine.adapters()) == {"b", "c"} and engine.stats()["slots_used"] == 2
    assert engine.load_seconds("c") < 5


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
    assert engine.stats()["active_rows"] == 0 and engine.slots.current()["run"].refs == 0


@pytest.mark.parametrize("kind", ["lora_regex", "prompt", "prefix"])
def test_logprobs_and_regex_scaling_equal_peft(setup: dict[str, Any], tmp_path: Path, kind: str) -> None:
    """Served greedy tokens, their logprobs (with top alternatives) and the prompt's logprobs (echo,
    log-likelihoods) equal peft's own log_softmax of the same adapter to 1e-4: for a LoRA with regex
    alpha_pattern/rank_pattern keys (peft's semantics, asked from peft) and for prompt-style adapters."""
    spec = setup["spec"]
    path = (
        setup["paths"][kind] if kind in setup["paths"] else make_adapter(spec, kind, tmp_path / kind, seed=11)
    )
    engine = new_engine(spec)
    engine.add_adapter("a", str(path))
    prompt = prompts(engine.tokenizer, 2)[1]
    eos = engine.tokenizer.eos_token_id

    async def main() -> tuple[list[TokenEvent], list[tuple[float | None, list[tuple[int, float]]]]]:
        events = await collect(engine, prompt, "a", max_tokens=8, temperature=0, logprobs=3)
        scored = await engine.prompt_logprobs(prompt + [e.token_id for e in events], "a", top=2)
        return events, scored

    events, scored = asyncio.run(main())
    tokens = [e.token_id for e in events]
    assert tokens == peft_generate(spec, path, prompt, eos, max_new_tokens=8)
    ref = peft_logprobs(spec, path, prompt + tokens)
    for j, event in enumerate(events):  # generated token j is sequence position len(prompt) + j
        row = ref[len(prompt) + j - 1]
        assert event.logprob == pytest.approx(float(row[event.token_id]), abs=1e-4)
        assert event.top_logprobs is not None and len(event.top_logprobs) == 3
        assert event.top_logprobs[0][0] == event.token_id  # greedy: the best one
        best = row.topk(3)
        for (tid, lp), v, i in zip(event.top_logprobs, best.values, best.indices, strict=True):
            assert tid == int(i) and lp == pytest.approx(float(v), abs=1e-4)
    assert scored[0] == (None, [])
    seq = prompt + tokens
    for i in range(1, len(seq)):
        lp, top = scored[i]
        assert lp == pytest.approx(float(ref[i - 1, seq[i]]), abs=1e-4)
        assert [t for t, _ in top] == ref[i - 1].topk(2).indices.tolist()
    if kind == "lora_regex":  # the regex keys really matter: the base answers otherwise
        assert not torch.allclose(ref, peft_logprobs(spec, None, seq), atol=1e-2)


def test_hot_swaps_and_unloads_under_load_equal_peft(setup: dict[str, Any]) -> None:
    """Many concurrent requests over the base and two adapters while another thread (as Serve's multiplex
    unloads from an executor thread) hot-swaps one and unloads/reloads the other: every answer equals the
    peft greedy answer of one version of its adapter, never a mix or another adapter's."""
    import threading

    spec, paths = setup["spec"], setup["paths"]
    engine = new_engine(spec)
    engine.pipeline = True  # as on a GPU: swaps land between steps launched one ahead
    versions = {None: [None], "x": ["lora4", "dora"], "y": ["ia3", "lora8"]}
    texts = prompts(engine.tokenizer, 2)
    eos = engine.tokenizer.eos_token_id
    n = 6
    refs = {
        (aid, i): {tuple(peft_generate(spec, paths[k] if k else None, texts[i], eos, n)) for k in kinds}
        for aid, kinds in versions.items()
        for i in range(len(texts))
    }
    for i in range(len(texts)):  # the answers tell the adapters apart
        assert len(set().union(*(refs[(aid, i)] for aid in versions))) == 5
    engine.add_adapter("x", str(paths["lora4"]))
    engine.add_adapter("y", str(paths["ia3"]))
    done = threading.Event()

    def swapper() -> None:
        for i in range(12):
            engine.add_adapter("x", str(paths[versions["x"][i % 2]]))  # hot swap
            engine.remove_adapter("y")  # unload, then load the other version
            engine.add_adapter("y", str(paths[versions["y"][(i + 1) % 2]]))
        done.set()

    answers: list[tuple[str | None, int, tuple[int, ...]]] = []

    async def client(k: int) -> None:
        while not done.is_set() or len(answers) < 12:
            aid, i = [None, "x", "y"][k % 3], k % len(texts)
            try:
                events = await collect(engine, texts[i], aid, max_tokens=n, temperature=0)
            except AdapterError as e:  # y between its unload and reload
                assert e.status == 404
                await asyncio.sleep(0.001)
                continue
            answers.append((aid, i, tuple(e.token_id for e in events)))
            k += 1

    async def main() -> None:
        thread = threading.Thread(target=swapper)
        thread.start()
        try:
            await asyncio.gather(*(client(k) for k in range(6)))
        finally:
            await asyncio.to_thread(thread.join)

    asyncio.run(main())
    for aid, i, tokens in answers:
        assert tokens in refs[(aid, i)], f"adapter {aid}, prompt {i}: {tokens}"
    assert {a for a, _, _ in answers} == {None, "x", "y"}
    assert engine.stats()["slots_used"] == 2  # every retired version's slot came back


def test_dropping_a_row_beside_prompt_adapter_rows(setup: dict[str, Any]) -> None:
    """A client going away while rows of prompt-embedding adapters run (two versions of one adapter from
    the same files, the same prompt: rows that a field-by-field comparison could only tell apart by their
    tensors) fails no other request."""
    spec, paths = setup["spec"], setup["paths"]
    engine = new_engine(spec)
    prompt = prompts(engine.tokenizer, 1)[0]
    eos = engine.tokenizer.eos_token_id
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)

    async def main() -> list[list[int]]:
        engine.add_adapter("p", str(paths["prompt"]))
        gone = engine.generate(prompt, "p", params)
        await anext(gone)
        engine.add_adapter("p", str(paths["prompt"]))  # a second version, equal in every field
        stays = [engine.generate(prompt, "p", params) for _ in range(2)]
        firsts = [await anext(s) for s in stays]
        await gone.aclose()  # the client went away: its row leaves at the next step
        answers = []
        for first, stream in zip(firsts, stays, strict=True):
            answers.append([first.token_id] + [e.token_id async for e in stream])
        return answers

    ref = peft_generate(spec, paths["prompt"], prompt, eos)
    assert asyncio.run(main()) == [ref, ref]


class _OnlyTokens:
    """A test constraint: only these tokens, complete after `n` of them."""

    def __init__(self, allowed: list[int], n: int) -> None:
        self.ids, self.n, self.seen = allowed, n, []

    def allowed(self, vocab_size: int) -> torch.Tensor:
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[self.ids] = True
        return mask

    def advance(self, token_id: int) -> None:
        assert token_id in self.ids
        self.seen.append(token_id)

    def is_terminated(self) -> bool:
        return len(self.seen) >= self.n


class _Broken(_OnlyTokens):
    def allowed(self, vocab_size: int) -> torch.Tensor:
        raise ValueError("broken grammar")


def test_sampling_controls_are_per_row(setup: dict[str, Any]) -> None:
    """logit_bias, penalties, stop tokens and constraints act on their own row in one batch; a row whose
    constraint breaks fails alone; the plain row next to them still equals peft. Out-of-range controls are
    refused with a 400 naming the field."""
    spec = setup["spec"]
    engine = new_engine(spec)
    tok = engine.tokenizer
    prompt = prompts(tok, 1)[0]
    eos = tok.eos_token_id
    ref = peft_generate(spec, None, prompt, eos)
    letters = tok.encode("ab")
    only = _OnlyTokens(letters, 3)

    async def main() -> list[Any]:
        return await asyncio.gather(
            collect(engine, prompt, None, max_tokens=NEW_TOKENS, temperature=0),
            collect(engine, prompt, None, max_tokens=5, temperature=0, logit_bias={letters[0]: 100.0}),
            collect(engine, prompt, None, max_tokens=NEW_TOKENS, temperature=0, frequency_penalty=100.0),
            collect(engine, prompt, None, max_tokens=NEW_TOKENS, temperature=0, stop_token_ids=[ref[1]]),
            collect(engine, prompt, None, max_tokens=NEW_TOKENS, temperature=0.8, seed=3, constraint=only),
            collect(engine, prompt, None, max_tokens=5, temperature=0, constraint=_Broken(letters, 1)),
            return_exceptions=True,
        )

    plain, biased, penalized, stopped, constrained, broken = asyncio.run(main())
    assert [e.token_id for e in plain] == ref
    assert [e.token_id for e in biased] == [letters[0]] * 5
    assert len({e.token_id for e in penalized}) == len(penalized)  # no token twice
    assert [e.token_id for e in stopped] == ref[:2] and stopped[-1].finish_reason == "stop"
    assert "".join(e.text for e in stopped) == tok.decode(ref[:1])  # the stop token's text is not sent
    assert [e.token_id for e in constrained] == only.seen and len(only.seen) == 3
    assert set(only.seen) <= set(letters) and constrained[-1].finish_reason == "stop"
    assert isinstance(broken, ValueError) and "broken grammar" in str(broken)
    for bad, field in (
        ({"stop": ["a", "b", "c", "d", "e"]}, "`stop`"),
        ({"stop": ["x" * 300]}, "`stop`"),
        ({"logprobs": 21}, "`top_logprobs`"),
        ({"logit_bias": {10**6: 1.0}}, "`logit_bias`"),
    ):
        with pytest.raises(AdapterError, match=field) as e:
            engine.generate(prompt, None, SamplingParams(**bad))
        assert e.value.status == 400
    assert engine.stats()["active_rows"] == 0


def test_bad_adapter_files_and_roots(setup: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    from serving.adapters import WEIGHTS_FILE, check_within_roots

    engine = new_engine(setup["spec"])
    cut = shutil.copytree(setup["paths"]["lora4"], tmp_path / "root" / "cut")
    data = (cut / WEIGHTS_FILE).read_bytes()
    (cut / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError) as e:
        engine.add_adapter("cut", str(cut))
    assert e.value.status == 400 and str(cut / WEIGHTS_FILE) in str(e.value)
    # A symlink out of every root is refused (403), whether the folder or one file inside it links out.
    inside = shutil.copytree(setup["paths"]["lora4"], tmp_path / "root" / "ok")
    check_within_roots(str(inside), [str(tmp_path / "root")])
    (tmp_path / "root" / "link").symlink_to(setup["paths"]["lora8"])
    linked = shutil.copytree(setup["paths"]["lora4"], tmp_path / "root" / "file")
    (linked / WEIGHTS_FILE).unlink()
    (linked / WEIGHTS_FILE).symlink_to(setup["paths"]["lora8"] / WEIGHTS_FILE)
    for bad in ("link", "file"):
        with pytest.raises(AdapterError) as e:
            check_within_roots(str(tmp_path / "root" / bad), [str(tmp_path / "root")])
        assert e.value.status == 403 and "outside the adapter roots" in str(e.value)


def test_kv_cache_that_cannot_fit_fails_at_start(setup: dict[str, Any]) -> None:
    from trainers.errors import FulcrumError

    with pytest.raises(FulcrumError, match="lower max_batch_rows or context_length"):
        new_engine(setup["spec"], max_batch_rows=10**6, context_length=256)


# --------------------------------------------------------------------------- prefix caching, chunked prefill
SYSTEM = "system: answer as the cat would. the cat sat on a mat and the dog ran to the park. user: "


def shared_prompts(tokenizer: Any) -> list[list[int]]:
    """Prompts that share a long head (a system prompt of 5 blocks of 16 tokens and more), and one that does
    not."""
    tails = ["where is the cat?", "where did the dog run to", "birds sang in tall green trees", "on a"]
    return [tokenizer.encode(SYSTEM + t) for t in tails] + [tokenizer.encode("a dog ran to the park")]


@pytest.mark.parametrize(
    "adapter,static", [(None, True), ("lora8", True), ("lora8", False)], ids=["base", "lora", "lora-dynamic"]
)
def test_prefix_cache_answers_equal_uncached_and_peft(
    setup: dict[str, Any], adapter: str | None, static: bool
) -> None:
    """Requests that share a prompt head prefill only the rest of their prompt over the cached head's keys
    and values, alone and in one batch with rows of other cached lengths and rows with no cached prefix;
    every answer equals the same engine's with the cache off and peft's greedy answer."""
    spec, paths = setup["spec"], setup["paths"]
    engines = [
        new_engine(spec, static_decode=static, context_length=256, prefix_cache_bytes=b) for b in [1 << 20, 0]
    ]
    for engine in engines:
        if adapter is not None:
            engine.add_adapter(adapter, str(paths[adapter]))
    on, off = engines
    assert on.prefix_cache is not None and off.prefix_cache is None
    batch = shared_prompts(on.tokenizer)
    first, rest = batch[0], [*batch[1:], batch[0]]  # the first again: a longer hit than the others'
    hits: list[int] = []

    async def run(engine: BatchEngine) -> list[list[int]]:
        alone = await collect(engine, first, adapter, max_tokens=NEW_TOKENS, temperature=0)
        hits.append(engine.stats()["prefix_cache_hits"])
        together = await asyncio.gather(
            *(collect(engine, p, adapter, max_tokens=NEW_TOKENS, temperature=0) for p in rest)
        )
        return [[e.token_id for e in events] for events in [alone, *together]]

    cached, uncached = asyncio.run(run(on)), asyncio.run(run(off))
    eos = on.tokenizer.eos_token_id
    refs = [peft_generate(spec, paths[adapter] if adapter else None, p, eos) for p in [first, *rest]]
    assert cached == uncached == refs
    stats = on.stats()
    assert hits[0] == 0 and stats["prefix_cache_queries"] == sum(len(p) for p in [first, *rest])
    # Three prompts hit the head's full blocks; the first again hits all but its last (partial) block.
    head = len(on.tokenizer.encode(SYSTEM)) // 16 * 16
    assert stats["prefix_cache_hits"] == 3 * head + (len(first) - 1) // 16 * 16, stats
    assert stats["prefix_cache_blocks"] > 0 and 0 < stats["prefix_cache_bytes"] <= 1 << 20


def test_prefix_cache_is_never_shared_across_adapter_versions(setup: dict[str, Any]) -> None:
    """A hot-swapped adapter (the same id, new weights) does not reuse the old version's cached prefixes:
    they are dropped when the old version retires, and its answer is the new weights' own; the base's and
    other adapters' prefixes are not theirs either."""
    spec, paths = setup["spec"], setup["paths"]
    engine = new_engine(spec)
    cache = engine.prefix_cache
    assert cache is not None
    engine.add_adapter("x", str(paths["lora4"]))
    one, two = shared_prompts(engine.tokenizer)[:2]
    eos = engine.tokenizer.eos_token_id

    async def answer(prompt: list[int], adapter: str | None) -> list[int]:
        events = await collect(engine, prompt, adapter, max_tokens=NEW_TOKENS, temperature=0)
        return [e.token_id for e in events]

    assert asyncio.run(answer(one, "x")) == peft_generate(spec, paths["lora4"], one, eos)
    old = engine.slots.current()["x"]
    assert any(key[0] is old for key in cache._blocks)
    assert asyncio.run(answer(one, None)) == peft_generate(spec, None, one, eos)  # the base: no hit
    assert engine.stats()["prefix_cache_hits"] == 0
    engine.add_adapter("x", str(paths["dora"]))  # hot swap: the old version retires
    assert not any(key[0] is old for key in cache._blocks)
    assert asyncio.run(answer(two, "x")) == peft_generate(spec, paths["dora"], two, eos)
    assert engine.stats()["prefix_cache_hits"] == 0  # nothing cached for the new version yet
    assert asyncio.run(answer(one, "x")) == peft_generate(spec, paths["dora"], one, eos)
    assert engine.stats()["prefix_cache_hits"] > 0  # the new version's own prefix, from the request before
    engine.remove_adapter("x")
    assert all(key[0] is None for key in cache._blocks)  # only the base's remain


def test_prefix_cache_stays_within_its_byte_budget(setup: dict[str, Any]) -> None:
    """With room for three blocks, prompts of more blocks evict the least recently used ones (never more
    bytes than the budget); answers stay right, and the latest prompt's head is what remains."""
    from serving.decode import kv_bytes_per_row

    spec = setup["spec"]
    model, _ = load_base(spec, "cpu")
    block = kv_bytes_per_row(model, 16)  # one block of 16 tokens, every layer's keys and values
    engine = new_engine(spec, prefix_cache_bytes=3 * block)
    cache = engine.prefix_cache
    assert cache is not None
    words = "the cat sat on a mat and the dog ran to the park while birds sang in tall green trees ".split()
    texts = [" ".join(words[i:] + words[:i]) for i in range(4)]  # ~80 tokens each, no shared head
    eos = engine.tokenizer.eos_token_id
    for text in texts:
        prompt = engine.tokenizer.encode(text)
        events = asyncio.run(collect(engine, prompt, None, max_tokens=4, temperature=0))
        assert [e.token_id for e in events] == peft_generate(spec, None, prompt, eos, max_new_tokens=4)
        assert len(cache) <= 3 and cache.bytes <= 3 * block
    assert len(cache) == 3 and cache.evictions >= 3 * len(texts) - 3
    last = engine.tokenizer.encode(texts[-1])
    assert cache.lookup(None, last)[0] == 3 * 16  # the latest prompt's first three blocks
    assert cache.lookup(None, engine.tokenizer.encode(texts[0]))[0] == 0


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(setup: dict[str, Any]) -> None:
    """With a chunk of 8 tokens, a 150-token prompt is prefilled over 19 engine steps while a running row
    gets a token at every one of them; its answer equals peft's. Sent again, its cached prefix leaves one
    chunk to prefill."""
    spec, paths = setup["spec"], setup["paths"]
    engine = new_engine(spec, context_length=256, prefill_chunk_tokens=8)
    engine.add_adapter("lora8", str(paths["lora8"]))
    words = "the cat sat on a mat and the dog ran to the park "
    long = engine.tokenizer.encode(words * 4)[:150]
    short = engine.tokenizer.encode("birds")  # one chunk
    eos = engine.tokenizer.eos_token_id
    # What the step thread does, in order: each chunk with the running rows' tokens so far, each decode.
    seen: list[tuple[str, list[int]]] = []
    chunk, decode = engine._prefill_chunk, engine._decode_forward

    def spy_chunk() -> None:
        seen.append(("chunk", [len(r.generated) for r in engine.scheduler.running]))
        chunk()

    def spy_decode(rows: list[Any], tokens: Any = None) -> torch.Tensor:
        seen.append(("decode", [len(r.generated) for r in rows]))
        return decode(rows, tokens)

    engine._prefill_chunk, engine._decode_forward = spy_chunk, spy_decode  # type: ignore[method-assign]

    async def main() -> tuple[list[int], list[int]]:
        running = engine.generate(short, None, SamplingParams(max_tokens=60, temperature=0))
        first = await anext(running)  # decoding
        rest = asyncio.create_task(collect_rest(running))
        answer = await collect(engine, long, "lora8", max_tokens=NEW_TOKENS, temperature=0)
        return [first.token_id] + await rest, [e.token_id for e in answer]

    async def collect_rest(stream: Any) -> list[int]:
        return [e.token_id async for e in stream]

    short_tokens, long_tokens = asyncio.run(main())
    assert long_tokens == peft_generate(spec, paths["lora8"], long, eos)
    assert short_tokens == peft_generate(spec, None, short, eos, max_new_tokens=60)
    chunks = [i for i, (what, _) in enumerate(seen) if what == "chunk"]
    assert len(chunks) == -(-len(long) // 8) == 19
    made = [seen[i][1][0] for i in chunks]  # the running row's tokens at each chunk
    assert made == list(range(made[0], made[0] + 19)), made  # one more at every step of the prefill
    assert [seen[i + 1] for i in chunks[:-1]] == [("decode", [n]) for n in made[:-1]]  # decoded alone
    assert seen[chunks[-1] + 1][0] == "decode" and len(seen[chunks[-1] + 1][1]) == 2  # then together
    # Again: all but the last partial block of the prompt comes from the prefix cache, one chunk runs.
    hits = engine.stats()["prefix_cache_hits"]
    seen.clear()
    again = asyncio.run(collect(engine, long, "lora8", max_tokens=NEW_TOKENS, temperature=0))
    assert [e.token_id for e in again] == long_tokens
    assert engine.stats()["prefix_cache_hits"] - hits == 144 and [w for w, _ in seen].count("chunk") == 1


def test_cancel_mid_chunked_prefill_releases_the_lease(setup: dict[str, Any]) -> None:
    """A client that goes away while its long prompt is being prefilled chunk by chunk: the request is
    dropped at the next step, its adapter lease released, and its row is free for the next request."""
    spec, paths = setup["spec"], setup["paths"]
    engine = new_engine(spec, context_length=256, prefill_chunk_tokens=4, max_batch_rows=1)
    engine.add_adapter("a", str(paths["lora4"]))
    long = engine.tokenizer.encode("the cat sat on a mat and the dog ran to the park " * 4)[:200]
    short = prompts(engine.tokenizer, 1)[0]

    async def main() -> int:
        clock = asyncio.get_running_loop().time
        task = asyncio.create_task(collect(engine, long, "a", max_tokens=4, temperature=0))
        deadline = clock() + 60
        while not (engine.scheduler.prefilling is not None and engine.scheduler.prefilling.prefilled >= 8):
            assert clock() < deadline and not task.done()
            await asyncio.sleep(0.001)
        assert engine.slots.current()["a"].refs == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        prefilled = engine.scheduler.prefilling.prefilled if engine.scheduler.prefilling else 0
        while engine.scheduler.busy():
            assert clock() < deadline
            await asyncio.sleep(0.001)
        assert engine.slots.current()["a"].refs == 0 and engine.stats()["active_rows"] == 0
        # The one row is free again: the next request (on the same adapter) is answered.
        events = await collect(engine, short, "a", max_tokens=3, temperature=0)
        assert [e.token_id for e in events] == peft_generate(
            spec, paths["lora4"], short, engine.tokenizer.eos_token_id, max_new_tokens=3
        )
        return prefilled

    assert asyncio.run(main()) < len(long)  # it was cancelled mid-prefill
    assert engine.slots.current()["a"].refs == 0
