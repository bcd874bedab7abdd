"""Are the engine's fast paths exact? Greedy tokens of a mixed batch against peft's own, in float32.

bf16 runs of the speed benchmark (serve_bench.py) cannot answer this: on its random base the logits are
nearly flat, so kernels that sum in another order flip near-ties. In float32 they must not. Each engine mode
answers the same mixed batch (`--adapters` distinct LoRA adapters, base rows among them); peft answers it
with `generate(adapter_names=...)`, and the table counts the requests whose tokens are identical.

    python -m benchmarks.serve_exact --shape 0.95b --device cuda --adapters 8 --prompts 32
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import SHAPES
from benchmarks.serve_bench import (
    SMALL,
    add_engine_options,
    engine_run,
    engine_with_adapters,
    make_adapters,
    prompt_texts,
)
from serving.engine import load_base
from trainers.spec import ModelSpec

MODES = {  # --modes name -> (engine arguments, SlotState.lora_mode)
    "auto": ({"cuda_graphs": True}, "auto"),  # on a GPU: compiled, per-row LoRA kernels
    "dense": ({"cuda_graphs": True}, "dense"),  # compiled, dense LoRA GEMMs
    "uncompiled": ({"cuda_graphs": True, "compile_decode": False}, "auto"),
}


def engine_tokens(
    args: argparse.Namespace,
    spec: ModelSpec,
    adapters: list[Path],
    ids: list[str | None],
    options: dict,
    mode: str,
) -> tuple[list[list[int]], str]:
    engine, tokenizer = engine_with_adapters(args, spec, adapters, **options)
    engine.slot_state.lora_mode = mode
    prompts = [tokenizer.encode(t) for t in prompt_texts(args.prompts, args.prompt_tokens)]
    result = asyncio.run(engine_run(engine, prompts, ids, args.new_tokens))  # type: ignore[arg-type]
    return result["_tokens"], engine.decode_mode


def peft_tokens(
    args: argparse.Namespace, spec: ModelSpec, adapters: list[Path], ids: list[str | None]
) -> list[list[int]]:
    from peft import PeftModel

    model, tokenizer = load_base(spec, args.device)
    peft_model: Any = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="lora-0")
    for i, path in enumerate(adapters[1:], start=1):
        peft_model.load_adapter(str(path), adapter_name=f"lora-{i}")
    texts = prompt_texts(args.prompts, args.prompt_tokens)
    batch = torch.tensor([tokenizer.encode(t) for t in texts], device=model.device)
    with torch.inference_mode():
        out = peft_model.generate(
            input_ids=batch,
            attention_mask=torch.ones_like(batch),
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            adapter_names=[i if i is not None else "__base__" for i in ids],
            pad_token_id=tokenizer.pad_token_id,
        )
    return out[:, batch.shape[1] :].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_engine_options(parser, prompts=32, prompt_tokens=64, new_tokens=32, out="/tmp/fulcrum-serve-exact")
    parser.add_argument("--modes", default=",".join(MODES), help="engine modes, comma-separated")
    args = parser.parse_args()
    config = SMALL if args.shape == "small" else SHAPES[args.shape]
    spec = ModelSpec(config=dict(config), tokenizer="bytes", dtype="float32")
    torch.manual_seed(0)
    adapters = make_adapters(
        spec, args.device, args.adapters, args.rank, args.out / f"{args.shape}-r{args.rank}"
    )
    # Every (adapters + 1)-th request on the base: base rows ride in the same batch.
    ids = [
        None if i % (args.adapters + 1) == 0 else f"lora-{i % (args.adapters + 1) - 1}"
        for i in range(args.prompts)
    ]
    reference = peft_tokens(args, spec, adapters, ids)
    print(
        f"\n{args.shape} Llama on {args.device}, float32, {args.prompts} requests, "
        f"{args.adapters} adapters + the base"
    )
    print(
        "| engine mode | LoRA | decode step | requests identical to peft greedy |\n| --- | --- | --- | --- |"
    )
    for name in args.modes.split(","):
        options, lora_mode = MODES[name]
        tokens, decode = engine_tokens(args, spec, adapters, ids, options, lora_mode)
        same = sum(a == b for a, b in zip(tokens, reference, strict=True))
        print(f"| {name} | {lora_mode} | {decode} | {same}/{len(reference)} |", flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
