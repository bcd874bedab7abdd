"""The OpenAI API over real Ray Serve and HTTP: one deployment (a 2-layer Llama, byte tokenizer, adapters of
four kinds made with peft) shared by every test here, driven by the official `openai` client and by plain
HTTP (urllib). Answers are checked against plain peft `generate` for the same adapter."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import TINY_LLAMA
from trainers.manifest import FORMAT, MANIFEST_FILE, base_identity
from trainers.spec import ModelSpec

NEW_TOKENS = 10
PROMPT = "the cat sat on"
ADMIN, TEAM = "sk-admin-test", "sk-team-test"
BASE_NAME = "tiny"
SERVED = {"lora-a": "lora4", "lora-b": "lora8", "dora": "dora", "ia3": "ia3", "prompt": "prompt"}
KIND_METHOD = {"lora4": "lora", "lora8": "lora"}
FILE_URI_IDS = {"ia3": "file://"}  # adapters the served fixture names by a file:// URI


# --------------------------------------------------------------------------- adapters made with peft
def _spec(**config: Any) -> ModelSpec:
    return ModelSpec(config={**TINY_LLAMA, **config}, tokenizer="bytes")


def _base(spec: ModelSpec) -> tuple[Any, Any]:
    from serving.engine import load_base

    return load_base(spec, "cpu")


def make_adapter(spec: ModelSpec, kind: str, out: Path, seed: int, manifest: bool = True) -> Path:
    from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model

    everything = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = {
        "lora4": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        "lora8": LoraConfig(r=8, lora_alpha=16, target_modules=everything, task_type="CAUSAL_LM"),
        "dora": LoraConfig(
            r=4, lora_alpha=4, target_modules=everything, use_dora=True, task_type="CAUSAL_LM"
        ),
        "ia3": IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"],
            feedforward_modules=["down_proj"],
            task_type="CAUSAL_LM",
        ),
        "prompt": PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    }[kind]
    torch.manual_seed(seed)
    model = get_peft_model(_base(spec)[0], config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # peft starts most adapters as no-ops: give every trainable tensor real values
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.rand(p.shape, generator=gen) * 2.5 + 0.2 if "ia3_l" in name else None
                p.copy_(noise if noise is not None else torch.randn(p.shape, generator=gen) * 0.4)
    model.save_pretrained(out)
    if manifest:
        body = {
            "format": FORMAT,
            "kind": "adapter",
            "method": KIND_METHOD.get(kind, kind),
            "base": base_identity(spec),
        }
        (out / MANIFEST_FILE).write_text(json.dumps(body))
    return out


def peft_answer(
    spec: ModelSpec, adapter: Path | None, prompt_ids: list[int], new_tokens: int = NEW_TOKENS
) -> tuple[str, int]:
    """(text, token count) that plain transformers + peft `generate` gives, greedy, for one adapter alone."""
    from peft import PeftModel

    model, tokenizer = _base(spec)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    ids = torch.tensor([prompt_ids])
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
            eos_token_id=eos, pad_token_id=eos,
        )  # fmt: skip
    new = out[0, len(prompt_ids) :].tolist()
    text = tokenizer.decode([t for t in new if t != eos], skip_special_tokens=True)
    return text.rstrip("\ufffd"), len(new)  # an incomplete last character is never sent


# --------------------------------------------------------------------------- one deployment for the module
@pytest.fixture(scope="module")
def served(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from cluster.serve_cmd import free_port, start, stop
    from serving.config import parse_serve_config

    spec = _spec()
    root = tmp_path_factory.mktemp("adapters")
    paths = {aid: make_adapter(spec, kind, root / aid, seed=i + 1, manifest=i != 1) for i, (aid, kind) in
             enumerate(SERVED.items())}  # fmt: skip
    paths["swap-v2"] = make_adapter(spec, "lora4", root / "swap-v2", seed=42)
    paths["late"] = make_adapter(spec, "ia3", root / "late", seed=43)
    other = _spec(hidden_size=32, intermediate_size=64)
    wrong = make_adapter(other, "lora4", root / "wrong-base", seed=7)
    outside = make_adapter(spec, "lora4", tmp_path_factory.mktemp("elsewhere") / "outside", seed=8)
    config = parse_serve_config(
        {
            "model": {"config": TINY_LLAMA, "tokenizer": "bytes"},
            "name": BASE_NAME,
            # One adapter by a file:// URI: read through trainers.storage like s3:// ones (its folder, as a
            # file:// root, lets POST /v1/adapters register URIs beside it).
            "adapters": {aid: FILE_URI_IDS.get(aid, "") + str(paths[aid]) for aid in SERVED},
            "max_adapters_per_replica": 3,  # fewer than the 5 adapters: the LRU evicts and reloads
            "max_batch_rows": 8,
            "context_length": 96,
            "max_body_bytes": 4096,
            "resources": {"cpus": 1},
            "port": free_port(),
            "app_name": "fulcrum-test",
            "api_keys": [{"key": ADMIN, "admin": True}, {"key": TEAM, "adapters": ["lora-a", BASE_NAME]}],
        }
    )
    url = start(config)
    _, tokenizer = _base(spec)
    prompt_ids = tokenizer(PROMPT, add_special_tokens=True)["input_ids"]
    refs = {aid: peft_answer(spec, paths[aid], prompt_ids) for aid in paths}
    refs[BASE_NAME] = peft_answer(spec, None, prompt_ids)
    yield {"url": url, "paths": paths, "refs": refs, "wrong": wrong, "outside": outside, "root": root,
           "config": config, "tokenizer": tokenizer, "spec": spec}  # fmt: skip
    stop(config)


def call(
    url: str, method: str, path: str, body: Any = None, key: str | None = ADMIN, raw: bytes | None = None
) -> Any:
    """Plain HTTP: (status, parsed JSON body)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def complete(url: str, model: str, **extra: Any) -> Any:
    body = {"model": model, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0, **extra}
    return call(url, "POST", "/v1/completions", body)


def client(url: str, key: str = ADMIN) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


# --------------------------------------------------------------------------- tests
def test_models_list_base_and_adapters_with_parent(served: Any) -> None:
    models = {m.id: m for m in client(served["url"]).models.list().data}
    assert set(models) == {BASE_NAME, *SERVED}
    assert models[BASE_NAME].model_extra["parent"] is None
    assert all(models[a].model_extra["parent"] == BASE_NAME for a in SERVED)
    assert models["dora"].model_extra["method"] == "dora" and models["ia3"].model_extra["method"] == "ia3"
    status, body = call(served["url"], "GET", "/v1/models", key=TEAM)  # a limited key sees its models only
    assert status == 200 and [m["id"] for m in body["data"]] == [BASE_NAME, "lora-a"]


def test_concurrent_completions_equal_peft_for_each_adapter(served: Any) -> None:
    url, refs = served["url"], served["refs"]
    results: dict[str, Any] = {}
    ids = [BASE_NAME, *SERVED]

    def one(model: str) -> None:
        results[model] = complete(url, model)

    threads = [threading.Thread(target=one, args=(m,)) for m in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for model in ids:
        status, body = results[model]
        assert status == 200, body
        text, count = refs[model]
        assert body["choices"][0]["text"] == text, model
        assert body["usage"] == {"prompt_tokens": len(PROMPT), "completion_tokens": count,
                                 "total_tokens": len(PROMPT) + count}  # fmt: skip
        assert body["choices"][0]["finish_reason"] == ("length" if count == NEW_TOKENS else "stop")
    answers = {body["choices"][0]["text"] for _, body in results.values()}
    assert len(answers) >= len(ids) - 1  # the adapters really change the answer


def test_chat_through_openai_client_uses_chat_template(served: Any) -> None:
    tokenizer, spec = served["tokenizer"], served["spec"]
    messages = [{"role": "user", "content": "hi cat"}]
    reply = client(served["url"]).chat.completions.create(
        model="lora-a", messages=messages, max_tokens=NEW_TOKENS, temperature=0
    )
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    want, count = peft_answer(spec, served["paths"]["lora-a"], ids)
    assert reply.choices[0].message.content == want
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == count


def test_streaming_sends_sse_with_final_usage(served: Any) -> None:
    url = served["url"]
    chunks = list(
        client(url).completions.create(
            model="dora", prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0, stream=True
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == served["refs"]["dora"][0]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == served["refs"]["dora"][1]
    # Plain HTTP: the wire format, ending with [DONE].
    body = {"model": "ia3", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "stream": True}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST")
    req.add_header("Authorization", f"Bearer {ADMIN}")
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in resp.read().decode().split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert parsed[0]["choices"][0]["delta"]["role"] == "assistant"
    assert (
        parsed[-1]["usage"]["completion_tokens"] == 4
        and parsed[-2]["choices"][0]["finish_reason"] == "length"
    )


def test_stop_strings_and_seeded_sampling(served: Any) -> None:
    url, (text, _) = served["url"], served["refs"]["lora-b"]
    stop = next(ch for ch in text[1:] if ch.isascii() and ch.isalnum())  # the answers are random bytes
    status, body = complete(url, "lora-b", stop=[stop])
    assert status == 200 and body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["text"] == text[: text.find(stop)]  # the stop string is not part of the text
    sampled = [
        complete(url, "lora-b", temperature=1.0, top_p=0.9, seed=s)[1]["choices"][0]["text"]
        for s in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1]  # the same seed repeats, whatever else is in the batch


def test_errors_are_openai_error_objects_naming_the_field(served: Any) -> None:
    url = served["url"]
    status, body = complete(url, "nope")
    assert status == 404 and body["error"]["param"] == "model"
    assert all(i in body["error"]["message"] for i in [BASE_NAME, *SERVED])
    status, body = call(url, "POST", "/v1/completions", raw=b'{"model": "tiny", "prompt": ')
    assert status == 400 and "malformed JSON" in body["error"]["message"]
    for field, value in [("temperature", -0.5), ("top_p", 0), ("top_p", 1.5), ("max_tokens", 0), ("n", 0)]:
        status, body = complete(url, "lora-a", **{field: value})
        assert (status, body["error"]["param"]) == (400, field), (field, value, body)
    status, body = complete(url, "lora-a", max_tokens=95)  # prompt + max_tokens over the 96-token context
    assert (status, body["error"]["param"]) == (400, "max_tokens") and "context length is 96" in body[
        "error"
    ]["message"]
    status, body = complete(url, "lora-a", max_tokenz=3)
    assert (status, body["error"]["param"]) == (400, "max_tokenz")
    status, body = complete(url, "lora-a", prompt="x" * 5000)
    assert status == 413 and body["error"]["type"] == "invalid_request_error"
    from openai import BadRequestError, NotFoundError

    with pytest.raises(NotFoundError):
        client(url).completions.create(model="missing", prompt="x", max_tokens=2)
    with pytest.raises(BadRequestError, match="temperature"):
        client(url).completions.create(model="lora-a", prompt="x", max_tokens=2, temperature=-1)


def test_api_keys_and_admin_routes(served: Any) -> None:
    url = served["url"]
    assert call(url, "GET", "/v1/models", key=None)[0] == 401
    status, body = call(url, "GET", "/v1/models", key="sk-wrong")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert (
        call(url, "POST", "/v1/completions", {"model": "lora-a", "prompt": "x", "max_tokens": 2}, key=TEAM)[0]
        == 200
    )
    status, body = call(url, "POST", "/v1/completions", {"model": "lora-b", "prompt": "x"}, key=TEAM)
    assert status == 403 and body["error"]["param"] == "model"
    status, body = call(
        url, "POST", "/v1/adapters", {"id": "x", "path": str(served["paths"]["late"])}, key=TEAM
    )
    assert status == 403 and "admin" in body["error"]["message"]
    assert call(url, "DELETE", "/v1/adapters/lora-a", key=TEAM)[0] == 403


def test_registration_is_validated(served: Any) -> None:
    url = served["url"]
    status, body = call(url, "POST", "/v1/adapters", {"id": "wrong", "path": str(served["wrong"])})
    message = body["error"]["message"]
    assert status == 400 and "hidden_size=32" in message and "hidden_size=64" in message, message
    status, body = call(url, "POST", "/v1/adapters", {"id": "out", "path": str(served["outside"])})
    assert (status, body["error"]["param"]) == (400, "path")
    status, body = call(url, "POST", "/v1/adapters", {"id": "../etc", "path": str(served["paths"]["late"])})
    assert (status, body["error"]["param"]) == (400, "id")
    link = served["root"] / "link-out"
    link.symlink_to(served["outside"])  # a symlink under a root that leads outside it
    status, body = call(url, "POST", "/v1/adapters", {"id": "linked", "path": str(link)})
    assert (status, body["error"]["param"]) == (403, "path")
    # A real folder under a root whose weights file is a link out of every root.
    sneaky = served["root"] / "sneaky"
    sneaky.mkdir()
    for f in served["outside"].iterdir():
        (sneaky / f.name).symlink_to(f)
    status, body = call(url, "POST", "/v1/adapters", {"id": "sneaky", "path": str(sneaky)})
    assert (status, body["error"]["param"]) == (403, "path"), body
    for bad in (".", "..", "x" * 129):
        status, body = call(url, "POST", "/v1/adapters", {"id": bad, "path": str(served["paths"]["late"])})
        assert (status, body["error"]["param"]) == (400, "id"), bad
    assert call(url, "GET", "/v1/models/wrong")[0] == 404


def test_lru_eviction_reloads_on_demand(served: Any) -> None:
    from ray import serve

    url, refs = served["url"], served["refs"]
    model = serve.get_deployment_handle("model", app_name="fulcrum-test")
    for aid in SERVED:  # five adapters through one replica that holds three
        status, body = complete(url, aid)
        assert status == 200 and body["choices"][0]["text"] == refs[aid][0]
    loaded = model.loaded.remote().result()
    assert len(loaded) == 3 and not any(x.startswith("lora-a@") for x in loaded), loaded
    status, body = complete(url, "lora-a")  # evicted: loads again and answers the same
    assert status == 200 and body["choices"][0]["text"] == refs["lora-a"][0]
    assert any(x.startswith("lora-a@") for x in model.loaded.remote().result())


def test_hot_swap_under_concurrent_load(served: Any) -> None:
    """A live server hammered over HTTP: clients on the base and on four adapters at once (more than the
    replica holds, so the LRU unloads and reloads under load), while one adapter is hot-swapped and another
    registered, deleted and registered again. Every answer is its adapter's own peft greedy answer (the
    swapped one: either version's), and no request fails."""
    url, paths, refs = served["url"], served["paths"], served["refs"]
    status, body = call(url, "POST", "/v1/adapters", {"id": "swap", "path": str(paths["lora-a"])})
    assert status == 200 and body["parent"] == BASE_NAME and body["replaced"] is False
    answers: list[tuple[str, int, str]] = []
    stop = threading.Event()
    allowed = {
        "swap": {refs["lora-a"][0], refs["swap-v2"][0]},
        BASE_NAME: {refs[BASE_NAME][0]},
        "lora-b": {refs["lora-b"][0]},
        "ia3": {refs["ia3"][0]},
        "dora": {refs["dora"][0]},
    }

    def keep_asking(model: str) -> None:
        while not stop.is_set():
            status, body = complete(url, model)
            text = body["choices"][0]["text"] if status == 200 else json.dumps(body)
            answers.append((model, status, text))

    def answered(model: str) -> int:
        return sum(1 for a in answers if a[0] == model)

    def wait_until(condition: Any) -> None:  # polls, not fixed sleeps: a loaded machine answers slower
        deadline = time.monotonic() + 180
        while not condition():
            assert time.monotonic() < deadline, f"timed out; answers so far: {answers[-5:]}"
            time.sleep(0.1)

    workers = [threading.Thread(target=keep_asking, args=(m,)) for m in ["swap", "swap", *allowed]]
    for w in workers:
        w.start()
    try:
        wait_until(lambda: all(answered(m) >= 1 for m in allowed))  # every client is in the batch
        # A relative path is looked up under the adapter roots.
        status, body = call(url, "POST", "/v1/adapters", {"id": "swap", "path": "swap-v2"})
        assert status == 200 and body["replaced"] is True
        swapped_at = answered("swap")
        for _ in range(2):  # registered, answering, deleted: twice, beside the others' traffic
            assert call(url, "POST", "/v1/adapters", {"id": "late-x", "path": str(paths["late"])})[0] == 200
            status, body = complete(url, "late-x")
            assert status == 200 and body["choices"][0]["text"] == refs["late"][0]
            assert call(url, "DELETE", "/v1/adapters/late-x")[1]["deleted"] is True
        wait_until(lambda: answered("swap") > swapped_at + 4)
    finally:
        stop.set()
    for w in workers:
        w.join()
    assert [a for a in answers if a[1] != 200] == []  # zero failed requests
    for model, _, text in answers:
        assert text in allowed[model], (model, text)
    swaps = [text for model, _, text in answers if model == "swap"]
    assert swaps[0] == refs["lora-a"][0] and swaps[-1] == refs["swap-v2"][0]
    assert call(url, "DELETE", "/v1/adapters/swap")[1]["deleted"] is True
    status, body = complete(url, "swap")
    assert status == 404 and "swap" not in body["error"]["message"].split("known:")[1]


def test_adapter_served_from_a_file_uri(served: Any) -> None:
    """Configured and registered by file:// URIs: read through trainers.storage.cached_local on the replica.
    (The s3:// twin of this test runs against the cluster-in-a-box S3 server: `assert_serves_uri` below.)"""
    url, paths, refs = served["url"], served["paths"], served["refs"]
    card = call(url, "GET", "/v1/models/ia3")[1]
    assert card["root"] == f"file://{paths['ia3']}" and card["method"] == "ia3", card
    assert complete(url, "ia3")[1]["choices"][0]["text"] == refs["ia3"][0]
    # Registered by URI: allowed because it lies under the configured file:// adapter's folder.
    assert_serves_uri(url, "late-uri", f"file://{paths['late']}", refs["late"][0])
    status, body = call(url, "POST", "/v1/adapters", {"id": "x", "path": f"file://{served['outside']}"})
    assert (status, body["error"]["param"]) == (400, "path")  # a URI outside every root


def assert_serves_uri(url: str, adapter_id: str, location: str, want: str) -> None:
    """Register `location` (a URI under an adapter root) as `adapter_id`, check its greedy answer, drop it."""
    status, body = call(url, "POST", "/v1/adapters", {"id": adapter_id, "path": location})
    assert status == 200 and body["root"] == location, body
    status, body = complete(url, adapter_id)
    assert status == 200 and body["choices"][0]["text"] == want, body
    assert call(url, "DELETE", f"/v1/adapters/{adapter_id}")[0] == 200


def test_registrations_survive_replica_restarts(served: Any) -> None:
    """Runtime registrations live in the registry file, the configured set in the ingress's user_config:
    killing every replica of the application (Serve starts new ones) loses neither."""
    import ray

    url, refs = served["url"], served["refs"]
    late = str(served["paths"]["late"])
    assert call(url, "POST", "/v1/adapters", {"id": "late", "path": late})[0] == 200
    assert call(url, "DELETE", "/v1/adapters/lora-b")[0] == 200  # a configured one, hidden at runtime
    replicas = [
        a for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::fulcrum-test#")
    ]  # fmt: skip
    assert len(replicas) == 2  # the ingress and the model replica
    for actor in replicas:
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=False)
    deadline = time.monotonic() + 120
    while True:
        try:
            status, body = complete(url, "late")
        except OSError:
            status, body = 0, {}
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert status == 200, body
    assert body["choices"][0]["text"] == refs["late"][0]
    now = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
           if a["name"].startswith("SERVE_REPLICA::fulcrum-test#")]  # fmt: skip
    assert not {a["name"] for a in replicas} & set(now)  # new replicas answered
    assert complete(url, "lora-a")[1]["choices"][0]["text"] == refs["lora-a"][0]
    assert complete(url, "lora-b")[0] == 404  # the runtime delete survived too


def test_user_config_update_changes_the_served_set_without_restarts(served: Any) -> None:
    """What a RayService update does: the same application applied again through Serve's REST API with a
    new `adapters` in the ingress's user_config. Serve calls reconfigure on the running replicas."""
    import ray
    from ray import serve
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    from serving.app import service_application

    paths, refs, app = served["paths"], served["refs"], "fulcrum-update"
    url = served["url"] + "/updated"
    args = {"model": {"config": TINY_LLAMA, "tokenizer": "bytes"}, "name": BASE_NAME, "max_batch_rows": 4,
            "context_length": 96, "resources": {"cpus": 1}}  # fmt: skip
    rest = ServeSubmissionClient("http://" + ray._private.worker.get_dashboard_url())

    def deploy(adapters: dict[str, str]) -> None:
        entry = service_application({**args, "adapters": adapters}, name=app)
        assert "adapters" not in entry["args"]  # args changes would rebuild and restart every replica
        entry["route_prefix"] = "/updated"
        http = {"host": "127.0.0.1", "port": served["config"].port}
        rest.deploy_applications({"http_options": http, "applications": [entry]})

    def answer(model: str, wanted: int) -> Any:
        deadline = time.monotonic() + 120
        while True:
            try:
                status, body = complete(url, model)
            except OSError:
                status, body = 0, {}
            if status == wanted or time.monotonic() > deadline:
                return status, body
            time.sleep(0.5)

    def replicas() -> set[str]:
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
        return {n for n in names if n.startswith(f"SERVE_REPLICA::{app}#")}

    try:
        deploy({"one": str(paths["lora-a"])})
        status, body = answer("one", 200)
        assert status == 200 and body["choices"][0]["text"] == refs["lora-a"][0], body
        assert complete(url, "two")[0] == 404
        before = replicas()
        assert len(before) == 2
        deploy({"two": f"file://{paths['dora']}"})
        status, body = answer("two", 200)
        assert status == 200 and body["choices"][0]["text"] == refs["dora"][0], body
        status, body = complete(url, "one")
        assert status == 404 and body["error"]["param"] == "model"
        assert [m["id"] for m in call(url, "GET", "/v1/models")[1]["data"]] == [BASE_NAME, "two"]
        assert replicas() == before  # reconfigured in place, not restarted
        # No `registry` in the args: runtime registration is off, and says how to turn it on. (A 409 and
        # not a 403: the request came from this machine, so a keyless server lets it try.)
        status, body = call(url, "POST", "/v1/adapters", {"id": "x", "path": str(paths["late"])}, key=None)
        assert (status, body["error"]["code"]) == (409, "registry_not_configured"), body
    finally:
        serve.delete(app)


# --------------------------------------------------------------------------- issue 22: inputs, clients, ops
def peft_prompt_logprobs(spec: ModelSpec, adapter: Path, ids: list[int]) -> tuple[list[float], list[int]]:
    """log_softmax of plain peft's logits: each prompt token's logprob given the ones before it, and the
    argmax token at each position."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(_base(spec)[0], str(adapter))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    own = logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    return own, logprobs.argmax(-1).tolist()


def test_inputs_in_range_work_and_others_name_the_field(served: Any) -> None:
    url = served["url"]
    # Inside the documented ranges: they work.
    for extra in ({"top_p": 1e-300, "temperature": 1.0, "seed": 3}, {"seed": (1 << 64) - 1, "temperature": 1},
                  {"seed": -(1 << 63), "temperature": 1}, {"logprobs": 0}, {"n": 2},
                  {"store": False, "metadata": {"a": "b"}, "user": "u", "parallel_tool_calls": False,
                   "stream_options": None, "service_tier": "auto"}):  # fmt: skip
        status, body = complete(url, "lora-a", **extra)
        assert status == 200, (extra, body)
    # Outside them (or malformed): 400 naming the field, never a 500.
    cases = [
        ({"seed": 1 << 64}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": ["x" * 257]}, "stop"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"99999": 1}}, "logit_bias"),
        ({"prompt": [[1, 2], [99999]]}, "prompt"),
        ({"logprobs": 21}, "logprobs"),
        ({"n": 129}, "n"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
         "response_format"),
    ]  # fmt: skip
    for extra, field in cases:
        status, body = complete(url, "lora-a", **extra)
        assert (status, body["error"]["param"]) == (400, field), (extra, body)
    raw = b'{"model": "lora-a", "prompt": "ab\\ud800c", "max_tokens": 2}'  # a lone surrogate
    status, body = call(url, "POST", "/v1/completions", raw=raw)
    assert (status, body["error"]["param"]) == (400, "prompt"), body
    deep = b'{"model": "lora-a", "prompt": "x", "metadata": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    status, body = call(url, "POST", "/v1/completions", raw=deep)
    assert status == 400 and "nests deeper" in body["error"]["message"], body
    status, body = call(
        url, "POST", "/v1/completions", raw=b'{"model": "lora-a", "prompt": "x", "temperature": NaN}'
    )
    assert status == 400, body
    chat = {"model": "lora-a", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}
    status, body = call(url, "POST", "/v1/chat/completions", chat)
    assert (status, body["error"]["param"]) == (400, "top_logprobs")


def test_loglikelihood_of_a_continuation_equals_peft(served: Any) -> None:
    """What lm-eval's loglikelihood sends: token-id prompts in one batched request, echo, logprobs, and
    max_tokens 0 (or 1, as local-completions does); the prompt's logprobs equal peft's log_softmax."""
    url, spec, tokenizer = served["url"], served["spec"], served["tokenizer"]
    contexts = ["the cat sat on", "a dog ran to the"]
    ids = [tokenizer(c + " the mat", add_special_tokens=True)["input_ids"] for c in contexts]
    for max_tokens in (0, 1):
        status, body = complete(url, "lora-a", prompt=ids, echo=True, logprobs=1, max_tokens=max_tokens)
        assert status == 200, body
        assert [c["index"] for c in body["choices"]] == [0, 1]
        for choice, prompt in zip(body["choices"], ids, strict=True):
            want, best = peft_prompt_logprobs(spec, served["paths"]["lora-a"], prompt)
            lp = choice["logprobs"]
            got = lp["token_logprobs"][: len(prompt)]
            assert got[0] is None and lp["top_logprobs"][0] is None
            assert got[1:] == pytest.approx(want, abs=1e-4)
            assert len(lp["tokens"]) == len(prompt) + max_tokens == len(lp["text_offset"])
            # The k=1 best is in each position's dict; greedy positions match peft's argmax.
            for i, top in enumerate(lp["top_logprobs"][1 : len(prompt)]):
                greedy = abs(max(top.values()) - got[i + 1]) < 1e-5  # what lm-eval's is_greedy asks
                assert max(top.values()) >= got[i + 1] - 1e-6 and greedy == (best[i] == prompt[i + 1])
            assert choice["text"].startswith(tokenizer.decode(prompt, skip_special_tokens=False))
    # A text prompt with echo: the text comes back first.
    status, body = complete(url, "lora-a", echo=True, max_tokens=3, logprobs=2)
    assert status == 200 and body["choices"][0]["text"].startswith(PROMPT)
    assert all(len(t) <= 3 for t in body["choices"][0]["logprobs"]["top_logprobs"][1:])


def test_logprobs_n_penalties_and_logit_bias(served: Any) -> None:
    url, tokenizer = served["url"], served["tokenizer"]
    a = tokenizer.convert_tokens_to_ids("a")
    reply = client(url).chat.completions.create(
        model="dora", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=3,
    )  # fmt: skip
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for item in content:  # greedy: the chosen token is the best of the top 3
        assert len(item.top_logprobs) == 3 and item.logprob == pytest.approx(item.top_logprobs[0].logprob)
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token
    # logprobs 0: the chosen token's logprob, not silently dropped.
    body = complete(url, "dora", logprobs=0)[1]
    lp = body["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == body["usage"]["completion_tokens"] and all(
        isinstance(x, float) for x in lp["token_logprobs"]
    )
    assert len(lp["tokens"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == len(lp["token_logprobs"])
    assert all(len(top) == 1 for top in lp["top_logprobs"])  # the chosen token's own, k = 0 more
    # n: three choices; seeded choices differ from each other and repeat with the same seed.
    texts = [
        [c["text"] for c in sorted(complete(url, "lora-a", n=3, temperature=1, seed=11)[1]["choices"],
                                   key=lambda c: c["index"])]
        for _ in range(2)
    ]  # fmt: skip
    assert texts[0] == texts[1] and len(set(texts[0])) > 1
    # logit_bias steers greedy decoding; frequency_penalty pushes a repeated token back down. (On the base,
    # whose logits lie close together; the test adapters' random weights spread them widely.)
    forced = complete(url, BASE_NAME, logit_bias={str(a): 5})[1]
    assert forced["choices"][0]["text"] == "a" * NEW_TOKENS
    damped = complete(url, BASE_NAME, logit_bias={str(a): 5}, frequency_penalty=2.0)[1]
    assert 0 < damped["choices"][0]["text"].count("a") < NEW_TOKENS
    assert complete(url, "lora-a", presence_penalty=1.5, frequency_penalty=-0.5)[0] == 200


WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 4},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
        "metric": {"type": "boolean"},
    },
    "required": ["city", "days", "metric"],
    "additionalProperties": False,
}


def test_response_format_output_parses_and_validates(served: Any) -> None:
    import jsonschema

    url, tokenizer = served["url"], served["tokenizer"]
    oai = client(url)
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
    for model in ("lora-a", "ia3", BASE_NAME):
        reply = oai.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "weather?"}], temperature=0,
            response_format=fmt,
        )  # fmt: skip
        jsonschema.validate(json.loads(reply.choices[0].message.content), WEATHER)
        assert reply.choices[0].finish_reason == "stop"
    chunks = oai.completions.create(
        model="dora", prompt="x", max_tokens=64, temperature=1, seed=5, stream=True,
        extra_body={"response_format": fmt},
    )  # fmt: skip
    jsonschema.validate(json.loads("".join(c.choices[0].text for c in chunks if c.choices)), WEATHER)
    # json_object: any object. A bias towards `}` gives the shortest one, and never a bare `}`.
    close = tokenizer.convert_tokens_to_ids("}")
    body = complete(url, "lora-a", response_format={"type": "json_object"}, logit_bias={str(close): 50})[1]
    assert body["choices"][0]["text"] == "{}", body


# A chat template that renders the tools it is given (compactly: the test model's context is 96 tokens).
TOOLS_TEMPLATE = (
    "{% if tools %}{{ tools | map(attribute='function.name') | join(',') }}{% endif %}|"
    "{% for m in messages %}{{ m.role[0] }}:{{ m.content or '' }};{% endfor %}>"
)
DAYS = {"type": "object", "properties": {"days": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["days"], "additionalProperties": False}  # fmt: skip
CLOSED = {"type": "object", "properties": {}, "additionalProperties": False}


def with_template(served: Any, aid: str, template: str) -> None:
    """Register a copy of lora-a that brings its own chat template."""
    import shutil

    folder = served["root"] / aid
    if not folder.exists():
        shutil.copytree(served["paths"]["lora-a"], folder)
        (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    assert call(served["url"], "POST", "/v1/adapters", {"id": aid, "path": str(folder)})[0] == 200


def test_tools_go_through_the_template_and_return_tool_calls(served: Any) -> None:
    import jsonschema

    with_template(served, "tools-tpl", TOOLS_TEMPLATE)
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": DAYS}},
        {
            "type": "function",
            "function": {"name": "noop", "parameters": CLOSED},
        },
    ]
    oai = client(served["url"])
    messages = [{"role": "user", "content": "weather?"}]
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        reply = oai.chat.completions.create(
            model="tools-tpl", messages=messages, tools=tools, tool_choice=choice, temperature=0
        )  # type: ignore[arg-type]
        assert reply.usage.prompt_tokens == len("get_weather,noop|u:weather?;>")  # the template saw them
        answer = reply.choices[0]
        assert answer.finish_reason == "tool_calls" and answer.message.content is None
        call_ = answer.message.tool_calls[0]
        assert call_.type == "function" and call_.id.startswith("call_")
        if choice != "required":
            assert call_.function.name == "get_weather"
        schema = DAYS if call_.function.name == "get_weather" else tools[1]["function"]["parameters"]
        jsonschema.validate(json.loads(call_.function.arguments), schema)
    # Streamed: the call arrives whole, as a tool_calls delta.
    chunks = list(oai.chat.completions.create(
        model="tools-tpl", messages=messages, tools=tools, tool_choice="required", temperature=0, stream=True
    ))  # type: ignore[arg-type]  # fmt: skip
    deltas = [c.choices[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and deltas[0].finish_reason == "tool_calls"
    # The tool's answer goes back in as a `tool` message after the assistant's call.
    follow = [*messages, answer.message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": call_.id, "content": "sunny"}]  # fmt: skip
    reply = oai.chat.completions.create(model="tools-tpl", messages=follow, tools=tools, max_tokens=3)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    call(served["url"], "DELETE", "/v1/adapters/tools-tpl")


def test_chat_template_is_bounded_and_renders_off_the_event_loop(served: Any) -> None:
    """An adapter whose chat template never ends gets a 400 after the deadline, while other requests on the
    same replica keep being answered; one that renders too much text gets a 400 too."""
    url = served["url"]
    templates = {
        "slow-tpl": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "big-tpl": "{% for i in range(100000) %}{{ 'xxxxxxxxxxxxxxxxxxxx' }}{% endfor %}",
    }
    for aid, template in templates.items():
        with_template(served, aid, template)
    results: dict[str, Any] = {}

    def slow() -> None:
        body = {"model": "slow-tpl", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        results["slow"] = call(url, "POST", "/v1/chat/completions", body)

    worker = threading.Thread(target=slow)
    worker.start()
    served_meanwhile = 0
    while worker.is_alive():  # the replica keeps answering while the template spins elsewhere
        status, _ = complete(url, "lora-a", max_tokens=2)
        served_meanwhile += status == 200
    worker.join()
    status, body = results["slow"]
    assert (status, body["error"]["param"]) == (400, "messages") and "longer than" in body["error"]["message"]
    assert served_meanwhile >= 1
    body = {"model": "big-tpl", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    status, body = call(url, "POST", "/v1/chat/completions", body)
    assert (status, body["error"]["param"]) == (400, "messages") and "limit" in body["error"]["message"]
    for aid in templates:
        call(url, "DELETE", f"/v1/adapters/{aid}")


def scrape(url: str) -> dict[str, float]:
    """The /metrics page as {series (name plus labels): value}; no key needed (as vLLM's)."""
    with urllib.request.urlopen(url + "/metrics", timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/plain")
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def test_health_and_metrics_move(served: Any) -> None:
    url = served["url"]
    with urllib.request.urlopen(url + "/health", timeout=60) as resp:
        assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
    before = scrape(url)
    names = ("fulcrum_num_requests_waiting", "fulcrum_num_requests_running", "fulcrum_kv_cache_usage_perc",
             "fulcrum_time_to_first_token_seconds_count", "fulcrum_adapter_loads_total",
             "fulcrum_adapter_evictions_total")  # fmt: skip
    for name in names:
        assert name in before, name
    for _ in range(3):
        assert complete(url, "lora-a")[0] == 200
    key = 'fulcrum_generation_tokens_total{adapter="lora-a"}'
    deadline = time.monotonic() + 60
    while True:  # replicas publish every second
        after = scrape(url)
        if after.get(key, 0) >= before.get(key, 0) + 3 * NEW_TOKENS or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert after[key] >= before.get(key, 0) + 3 * NEW_TOKENS
    assert (
        after['fulcrum_request_success_total{adapter="lora-a"}']
        >= before.get('fulcrum_request_success_total{adapter="lora-a"}', 0) + 3
    )
    for hist in ("time_to_first_token", "e2e_request_latency", "time_per_output_token"):
        name = f"fulcrum_{hist}_seconds_count"
        assert after[name] >= before[name] + 3, name
        assert after[f'fulcrum_{hist}_seconds_bucket{{le="+Inf"}}'] == after[name]
    # One replica serves this app; a replica that Serve replaced (a health check missed on a busy 2-core
    # machine) still counts until its last snapshot is STALE_S old, so allow that one.
    assert after["fulcrum_adapter_loads_total"] >= 1 and 1 <= after["fulcrum_replicas_reporting"] <= 2


def ray_export(app: str, names: tuple[str, ...]) -> dict[str, float]:
    """Ray's own Prometheus export (each live node's metrics agent, on the node's metrics export port): each
    of `names` summed over the series of application `app`'s replicas (0 where there is none yet)."""
    import ray

    totals = dict.fromkeys(names, 0.0)
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        address = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        with urllib.request.urlopen(address, timeout=60) as resp:
            text = resp.read().decode()
        for line in text.splitlines():
            series, _, value = line.rpartition(" ")
            name = series.split("{")[0]
            if name in totals and f'application="{app}"' in series:
                totals[name] += float(value)
    return totals


def test_ray_metrics_export_and_prefix_cache_counters_move(served: Any) -> None:
    """What the replica records into ray.serve.metrics reaches Ray's metrics agent (names with Ray's `ray_`
    prefix, tagged with the Serve application), and moves after requests; a prompt sent again is served
    partly from the prefix cache, which both Ray's export and the API's /metrics count. Ray's agent takes
    a few seconds to see new values: polled, with a deadline."""
    url = served["url"]
    names = tuple(
        f"ray_fulcrum_{n}"
        for n in ("request_success_total", "generation_tokens_total", "prompt_tokens_total",
                  "time_to_first_token_seconds_count", "e2e_request_latency_seconds_count",
                  "prefix_cache_queries_total", "prefix_cache_hits_total")
    )  # fmt: skip
    before, api_before = ray_export("fulcrum-test", names), scrape(url)
    prompt = "the cat sat on the mat and the dog ran to the park while"  # 56 tokens: 3 blocks of 16
    for _ in range(3):
        status, body = complete(url, "lora-a", prompt=prompt)
        assert status == 200, body
    wanted = {"request_success_total": 3, "time_to_first_token_seconds_count": 3,
              "e2e_request_latency_seconds_count": 3, "generation_tokens_total": 3,
              "prompt_tokens_total": 3 * len(prompt), "prefix_cache_queries_total": 3 * len(prompt),
              "prefix_cache_hits_total": 16}  # fmt: skip
    deadline = time.monotonic() + 120
    while True:
        after = ray_export("fulcrum-test", names)
        moved = {n: after[f"ray_fulcrum_{n}"] - before[f"ray_fulcrum_{n}"] for n in wanted}
        if all(moved[n] >= w for n, w in wanted.items()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert all(moved[n] >= w for n, w in wanted.items()), moved
    # The API's page sums the replicas' snapshots, published every second: polled too. Its counters keep
    # the totals of replicas that are gone, so they never go down.
    counters = ("fulcrum_prefix_cache_queries_total", "fulcrum_prefix_cache_hits_total")
    deadline = time.monotonic() + 30
    while True:
        api = scrape(url)
        grew = {n: api[n] - api_before.get(n, 0) for n in counters}
        if (grew[counters[0]] >= 3 * len(prompt) and grew[counters[1]] >= 16) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert grew[counters[0]] >= 3 * len(prompt) and grew[counters[1]] >= 16, grew
    assert 0 < api["fulcrum_prefix_cache_hit_rate"] <= 1


def test_health_is_503_until_a_model_replica_has_loaded_its_base(served: Any) -> None:
    """GET /health of an application whose model replica cannot start yet (it asks for more CPUs than the
    cluster has, as a replica waiting for a node to join would): the ingress answers 503 `loading`. The
    same application applied again with resources that fit (as a RayService update does): 200 once its
    model replica has loaded the base."""
    import ray
    from ray import serve
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    from serving.app import service_application

    app, prefix = "fulcrum-health", "/health-test"
    rest = ServeSubmissionClient("http://" + ray._private.worker.get_dashboard_url())

    def deploy(cpus: float) -> None:
        args = {"model": {"config": TINY_LLAMA, "tokenizer": "bytes"}, "name": BASE_NAME, "max_batch_rows": 2,
                "context_length": 96, "resources": {"cpus": cpus}}  # fmt: skip
        entry = {**service_application(args, name=app), "route_prefix": prefix}
        http = {"host": "127.0.0.1", "port": served["config"].port}
        rest.deploy_applications({"http_options": http, "applications": [entry]})

    def health() -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(served["url"] + prefix + "/health", timeout=60) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:  # our 503, or Serve's proxy before the ingress is routable
            status, raw = e.code, e.read()
        except OSError:
            return 0, None
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw

    def wait_for(status: int, state: str) -> tuple[int, Any]:
        deadline = time.monotonic() + 180
        while True:
            got = health()
            if (got[0] == status and isinstance(got[1], dict) and got[1].get("status") == state) or (
                time.monotonic() > deadline
            ):
                return got
            time.sleep(0.5)

    try:
        deploy(ray.cluster_resources()["CPU"] + 1)  # no node can hold the model replica
        status, body = wait_for(503, "loading")
        assert status == 503 and body["status"] == "loading" and "base is loading" in body["detail"], body
        assert health()[0] == 503  # still not ready: no model replica exists
        deploy(0.5)
        status, body = wait_for(200, "ok")
        assert (status, body) == (200, {"status": "ok"})
    finally:
        serve.delete(app)
    assert call(served["url"], "GET", "/health", key=None) == (200, {"status": "ok"})  # the other app
