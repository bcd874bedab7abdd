from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

PEFT_TYPE = "BOTTLENECK"
NONLINEARITIES = ("relu", "gelu", "silu", "tanh")


@dataclass
class BottleneckConfig(PeftConfig):
    """A bottleneck adapter after each targeted sub-block (by default the attention block and the MLP).

    bottleneck_size: width of the down-projection; non_linearity: relu, gelu, silu or tanh;
    scaling: multiplies the adapter's output; dropout: on the adapter's input.
    """

    bottleneck_size: int = field(default=64, metadata={"help": "Width of the bottleneck."})
    non_linearity: str = field(default="silu", metadata={"help": "relu, gelu, silu or tanh."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    scaling: float = field(default=1.0, metadata={"help": "Multiplies the adapter output."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Sub-blocks to follow with an adapter; default: the attention block and the MLP."},
    )
    exclude_modules: list[str] | str | None = field(default=None)
    modules_to_save: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE  # type: ignore[assignment]
        if self.non_linearity not in NONLINEARITIES:
            raise ValueError(f"non_linearity must be one of {NONLINEARITIES}, got {self.non_linearity!r}")
        if self.bottleneck_size < 1:
            raise ValueError("bottleneck_size must be >= 1")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
