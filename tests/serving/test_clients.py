"""Real clients against a served adapter, as their users run them: lm-eval's `local-completions` model (a
log-likelihood task and a generation task, local files only) and LangChain's ChatOpenAI
(`with_structured_output`, `bind_tools`). One small deployment for the module, started as `fulcrum serve`
starts it (cluster.serve_cmd.start)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import TINY_LLAMA
from tests.serving.test_api import ADMIN, TOOLS_TEMPLATE, _base, _spec, make_adapter

CONTEXT = 256


@pytest.fixture(scope="module")
def clients_served(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from cluster.serve_cmd import free_port, start, stop
    from serving.config import parse_serve_config

    spec = _spec()
    root = tmp_path_factory.mktemp("client-adapters")
    adapter = make_adapter(spec, "lora4", root / "tuned", seed=21)
    # The same adapter with a chat template that renders tools (the byte tokenizer's ChatML does not).
    tools = make_adapter(spec, "lora4", root / "tools", seed=21)
    (tools / "tokenizer_config.json").write_text(json.dumps({"chat_template": TOOLS_TEMPLATE}))
    config = parse_serve_config(
        {
            "model": {"config": TINY_LLAMA, "tokenizer": "bytes"},
            "name": "tiny",
            "adapters": {"tuned": str(adapter), "tools": str(tools)},
            "max_batch_rows": 8,
            "context_length": CONTEXT,
            "resources": {"cpus": 1},
            "port": free_port(),
            "app_name": "fulcrum-clients",
            "api_keys": [{"key": ADMIN, "admin": True}],
        }
    )
    url = start(config)
    yield {"url": url, "spec": spec, "adapter": adapter, "root": root}
    stop(config)


def peft_loglikelihood(spec: Any, adapter: Path, context: list[int], continuation: list[int]) -> float:
    from peft import PeftModel

    model = PeftModel.from_pretrained(_base(spec)[0], str(adapter))
    ids = context + continuation
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    own = logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(own[len(context) - 1 :].sum())


def test_lm_eval_local_completions_runs_loglikelihood_and_generation_tasks(
    clients_served: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tiny local task of each kind (no downloads); lm-eval's per-sample log-likelihoods equal peft's."""
    import yaml
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", ADMIN)
    rows = [
        {"q": "the cat sat on the", "choices": ["mat", "dog"], "answer": 0},
        {"q": "birds sang in tall", "choices": ["trees", "cars", "a"], "answer": 0},
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", "doc_to_text": "{{q}}"}  # fmt: skip
    tasks = {
        "fulcrum_mc": {**common, "output_type": "multiple_choice", "doc_to_choice": "{{choices}}",
                       "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]},
        "fulcrum_gen": {**common, "output_type": "generate_until", "doc_to_target": "{{choices[0]}}",
                        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
                        "metric_list": [{"metric": "exact_match"}]},
    }  # fmt: skip
    for name, task in tasks.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **task}))
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer = _base(clients_served["spec"])[1]
    tokenizer.save_pretrained(tokenizer_dir)
    model_args = {
        "base_url": f"{clients_served['url']}/v1/completions", "model": "tuned",
        "tokenizer": str(tokenizer_dir), "tokenizer_backend": "huggingface", "tokenized_requests": True,
        "max_length": CONTEXT, "num_concurrent": 2, "max_retries": 1, "timeout": 120,
    }  # fmt: skip
    out = simple_evaluate(
        model="local-completions",
        model_args=model_args,
        tasks=list(tasks),
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
        limit=None,
    )
    assert out is not None
    assert 0.0 <= out["results"]["fulcrum_mc"]["acc,none"] <= 1.0
    assert 0.0 <= out["results"]["fulcrum_gen"]["exact_match,none"] <= 1.0
    samples = out["samples"]["fulcrum_mc"]
    assert len(samples) == len(rows)
    for sample in samples:
        doc = sample["doc"]
        context = tokenizer(doc["q"], add_special_tokens=False)["input_ids"]
        for choice, resp in zip(doc["choices"], sample["resps"], strict=True):
            cont = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]  # lm-eval's delimiter
            want = peft_loglikelihood(clients_served["spec"], clients_served["adapter"], context, cont)
            assert resp[0][0] == pytest.approx(want, abs=1e-4), (doc, choice)
    gen = out["samples"]["fulcrum_gen"]
    assert len(gen) == len(rows) and all(isinstance(s["resps"][0][0], str) for s in gen)


def test_langchain_structured_output_and_bind_tools(clients_served: Any) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        """The weather somewhere."""

        city: str = Field(max_length=4)
        days: int = Field(ge=1, le=9)
        sunny: bool

    llm = ChatOpenAI(
        base_url=f"{clients_served['url']}/v1", api_key=ADMIN, model="tools", temperature=0, max_retries=0,
        timeout=120,
    )  # fmt: skip
    for method in ("json_schema", "function_calling"):
        answer = llm.with_structured_output(Weather, method=method).invoke("weather?")
        assert isinstance(answer, Weather) and 1 <= answer.days <= 9 and len(answer.city) <= 4, method

    class Days(BaseModel):
        days: int = Field(ge=1, le=9)

    @tool(args_schema=Days)
    def forecast(days: int) -> str:
        """Forecast for a number of days."""
        return "sunny"

    bound = ChatOpenAI(
        base_url=f"{clients_served['url']}/v1", api_key=ADMIN, model="tools", temperature=0, max_retries=0,
        timeout=120, max_tokens=80,
    ).bind_tools([forecast], tool_choice="forecast")  # fmt: skip
    message = bound.invoke("forecast please")
    assert message.tool_calls and message.tool_calls[0]["name"] == "forecast"
    assert isinstance(message.tool_calls[0]["args"]["days"], int)
