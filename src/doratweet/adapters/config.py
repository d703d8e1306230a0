"""What an adapter is, as values: its shape (`AdapterConfig`), and the record saved beside its weights
(`AdapterRecord`: the shape, the base model, and doratweet's notes on how it was made).

Both are immutable; a changed one is made with `dataclasses.replace`, which checks it again. The fields' `help`
metadata is the documentation, and the command line builds its options from it (cli.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from ..errors import UserError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_COUNT = 2**63 - 1  # the largest 64-bit integer: what torch takes as a number


def comma_separated(text: str) -> tuple[str, ...]:
    return tuple(name for name in text.split(",") if name)


# --layers: all, top:K (the last K decoder layers), or indices and ranges such as 22-29 or 0,2,4-6.
_LAYERS = re.compile(r"all|top:[1-9]\d*|\d+(-\d+)?(,\d+(-\d+)?)*")


def layer_indices(spec: str, layer_count: int) -> tuple[int, ...]:
    """The decoder layers (0 = nearest the input) that `spec` selects in a model of `layer_count` layers."""
    if spec == "all":
        return tuple(range(layer_count))
    if spec.startswith("top:"):  # the top K of fewer than K layers are all of them (a preset's top:15 on a small model)
        return tuple(range(max(0, layer_count - int(spec[4:])), layer_count))
    chosen = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        first, last = int(first), int(last or first)
        if last < first:
            raise UserError(f"--layers {spec}: the range {part} runs backwards; write it {last}-{first}")
        if last >= layer_count:  # checked before the range is made: 0-9999999999 would fill the memory
            raise UserError(f"--layers {spec}: this model has {layer_count} decoder layers, numbered "
                            f"0-{layer_count - 1}")
        chosen.update(range(first, last + 1))
    return tuple(sorted(chosen))


def layers_spec(indices) -> str:
    """The shortest --layers that selects `indices` (sorted): ranges joined by commas, e.g. 0-3,8."""
    parts, run = [], []
    for index in sorted(indices):
        if run and index != run[-1] + 1:
            parts.append(run)
            run = []
        run.append(index)
    parts += [run] if run else []
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in parts)


@dataclass(frozen=True)
class AdapterConfig:
    """The shape of a DoRA or LoRA adapter. `targets` are module-name suffixes (`q_proj` matches
    `model.layers.3.self_attn.q_proj`), or one string that is a regular expression over full module names
    (PEFT's convention)."""

    method: str = field(default="dora", metadata={"help": "adapter type: dora or lora"})
    rank: int = field(default=16, metadata={"help": "adapter rank r"})
    alpha: float = field(default=32.0, metadata={
        "help": "adapter alpha; the update is scaled by alpha/r (alpha/sqrt(r) with --rslora)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input (PEFT's formula)"})
    targets: tuple[str, ...] | str = field(default=DEFAULT_TARGETS, metadata={
        "help": "comma-separated module names to adapt", "parse": comma_separated})
    use_rslora: bool = field(default=False, metadata={
        "help": "scale by alpha/sqrt(r) (rank-stabilised LoRA)", "flag": "--rslora"})
    layers: str = field(default="all", metadata={
        "help": "decoder layers that get adapters: all, top:K (the K nearest the output; all of them in a model "
                "with fewer), or indices and ranges such as 22-29; the frozen layers below them run once per tweet, "
                "not every step (see --no-cache-frozen)"})

    def __post_init__(self):
        if not isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(self.targets))
        refuse_bad_values(self, [
            ("method", self.method in ("dora", "lora"), "choose dora or lora"),
            ("rank", self.rank >= 1, "must be 1 or more"),
            ("rank", self.rank <= MAX_COUNT, f"must be at most {MAX_COUNT}"),  # torch takes 64-bit integers
            ("alpha", 0 < self.alpha, "must be a positive number"),
            ("dropout", 0.0 <= self.dropout < 1.0, "must be in [0, 1)"),
            ("targets", len(self.targets) > 0, "name at least one module, e.g. q_proj,v_proj"),
            ("layers", isinstance(self.layers, str) and _LAYERS.fullmatch(self.layers) is not None,
             "choose all, top:K, or layer indices and ranges such as 22-29 or 0,2,4-6"),
            ("layers", self.layers == "all" or isinstance(self.targets, tuple),
             "works with module names in --targets, not with a regular expression"),
        ])


def refuse_bad_values(config, checks: list[tuple[str, bool, str]]) -> None:
    """Raise, naming the option as the command line spells it, for the first check that failed."""
    flags = {f.name: f.metadata.get("flag", "--" + f.name.replace("_", "-")) for f in fields(config)}
    for name, ok, fix in checks:
        if not ok:
            value = getattr(config, name)
            shown = ",".join(value) if isinstance(value, tuple) else value
            raise UserError(f"{flags[name]} {shown}: {fix}")


@dataclass(frozen=True)
class AdapterNotes:
    """doratweet's own section of adapter_config.json (PEFT ignores it): what the saved adapter needs to be used as
    it was trained, and where it came from."""

    base_fingerprint: dict | None = None  # a sketch of the base weights it was trained on (fingerprint.py)
    system_prompt: str | None = None
    model_spec: str | None = None  # the --model it was trained on, e.g. smollm2-135m for the embedded GGUF
    labels: tuple[str, ...] | None = None
    init_adapter: str | None = None  # the adapter it was trained further from
    train_skip: int | None = None  # train tweets left out first (those the init adapter saw)

    def updated(self, newer: AdapterNotes) -> AdapterNotes:
        """These notes with every field that `newer` sets taken from it."""
        return AdapterNotes(**{f.name: (getattr(newer, f.name) if getattr(newer, f.name) is not None
                                        else getattr(self, f.name)) for f in fields(self)})


@dataclass(frozen=True)
class AdapterRecord:
    """What adapter_config.json holds, and what a model with adapters carries (`adapter_record(model)`)."""

    config: AdapterConfig
    base_model_id: str | None = None  # the Hub id stock tools load the base model from
    notes: AdapterNotes = AdapterNotes()
