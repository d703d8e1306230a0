"""The settings of a run as one immutable tree, built once at the edge (the command line or the Python API) and
passed whole:

    RunConfig                   what `doratweet run` / `doratweet train` do: model, data, prompt, folders, limits
    ├── data: DataConfig        where the tweets come from and which columns hold what
    └── rounds: (Round, ...)    one or more rounds of training, each with
        └── train: TrainConfig      the optimisation (schedule, batches, validation, checkpoints), with
            └── adapter: AdapterConfig  the adapter's shape (adapters/config.py)

Every value is checked where it is defined (`__post_init__`); a change is made with `dataclasses.replace`, which
checks again. A field's `help` metadata is its documentation, and the command line builds its options from it
(cli.py), so a new option is one field here. A preset is a value of this tree too (`PRESETS`).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from . import distributed
from .adapters.config import MAX_COUNT, AdapterConfig, refuse_bad_values
from .errors import UserError
from .prompts import DEFAULT_SYSTEM_PROMPT

# torch.manual_seed takes 0..2**64-1 (a negative seed repeats a positive one's state); under torchrun rank r seeds
# with seed + 1_000_003 * r, which stays in range from any seed up to 2**63 - 1.
MAX_SEED = 2**63 - 1
# Far above any useful value, so that an absurd one (`--alpha 1e308`) is refused before anything is made instead of
# training into a NaN loss (alpha/r scales the update); weight decay stays at most 1 so that lr x decay, the share
# AdamW takes off each weight per step, stays below 1 (--lr is below 1). A saved adapter with a larger alpha still
# loads for evaluation and prediction (AdapterConfig takes any positive alpha); training refuses it.
MAX_ALPHA = 100_000
MAX_EPOCHS = 1_000_000
_COUNTS = ("batch_size", "grad_accum", "max_steps", "eval_every", "eval_limit", "save_every", "log_every",
           "eval_batch_size")  # go into torch as 64-bit integers: a larger one would raise OverflowError mid-run


def parse_precision(text: str) -> bool | None:
    """--train-precision: 'auto' (None: chosen by hardware.bf16_training_pays), 'fp32' or 'bf16'."""
    choices = {"auto": None, "fp32": False, "bf16": True}
    if text not in choices:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from auto, fp32, bf16)")
    return choices[text]


@dataclass(frozen=True)
class TrainConfig:
    """How an adapter is trained: AdamW on the adapter's parameters, linear warm-up then cosine decay, gradient
    accumulation and clipping, periodic validation keeping the best adapter, checkpoints."""

    adapter: AdapterConfig = AdapterConfig(dropout=0.05)
    epochs: float = field(default=1.0, metadata={"help": "passes over the training tweets (fractions allowed)"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate (AdamW, linear warm-up then cosine decay)"})
    batch_size: int = field(default=16, metadata={
        "help": "tweets per micro-batch, across all processes under torchrun"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_steps: int | None = field(default=None, metadata={
        "help": "stop after this many optimizer steps (overrides --epochs)"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "share of steps spent warming up the learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = 1.0
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the answer-token loss"})
    class_weighted: bool = field(default=False, metadata={
        "help": "weight each tweet's loss by the inverse of its label's share of the training tweets, so that every "
                "label counts alike, as in macro-F1"})
    seed: int = field(default=0, metadata={"help": "random seed (same seed, same result on CPU)"})
    eval_every: int = field(default=0, metadata={
        "help": "validate every N steps and keep the best adapter (0: only at the end)", "verbs": ("run", "train")})
    eval_limit: int | None = field(default=None, metadata={"help": "validate on the first N validation tweets"})
    save_every: int = field(default=0, metadata={
        "help": "write a resumable checkpoint every N steps (0: only on Ctrl-C)", "verbs": ("run", "train")})
    log_every: int = field(default=10, metadata={"help": "write the mean training loss to train_log.jsonl every N steps"})
    cache_frozen: bool = field(default=True, metadata={
        "help": "with --layers: run the frozen layers below the adapters at every step, instead of once per tweet "
                "with their output kept on disk under the cache folder (DORATWEET_CACHE); the cache is computed in "
                "fp32, so with bf16 training the two differ in the last bits"})
    eval_batch_size: int = 32  # validation tweets per batch
    bf16: bool | None = field(default=None, metadata={
        "flag": "--train-precision", "parse": parse_precision, "default_help": "auto", "metavar": "{auto,fp32,bf16}",
        "help": "arithmetic of training: fp32; bf16 (on a CPU the frozen weights are held in bf16; adapters, norms "
                "and the loss stay fp32); or auto: bf16 where bf16 is fast (CUDA, CPUs with AMX or AVX512-BF16), "
                "never for an fp64 model"})
    fsdp: bool = field(default=False, metadata={
        "help": "under torchrun: shard the base model across the processes (FSDP) instead of copying it to each "
                "(DDP), for models that do not fit one GPU", "verbs": ("train",)})

    def __post_init__(self):
        if not self.adapter.alpha <= MAX_ALPHA:
            raise UserError(f"--alpha {self.adapter.alpha}: must be a positive number, at most {MAX_ALPHA}")
        refuse_bad_values(self, [
            ("epochs", 0 < self.epochs <= MAX_EPOCHS, f"must be positive, at most {MAX_EPOCHS}"),
            ("lr", math.isfinite(self.lr) and 0 < self.lr < 1, "must be in (0, 1), e.g. 2e-4"),
            ("batch_size", self.batch_size >= 1, "must be 1 or more"),
            ("grad_accum", self.grad_accum >= 1, "must be 1 or more"),
            ("max_steps", self.max_steps is None or self.max_steps >= 1, "must be 1 or more"),
            ("warmup_ratio", 0.0 <= self.warmup_ratio < 1.0, "must be in [0, 1)"),
            ("weight_decay", 0 <= self.weight_decay <= 1, "must be in [0, 1] (AdamW's usual values are 0 to 0.1)"),
            ("max_grad_norm", math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0, "must be a positive number"),
            ("label_smoothing", 0.0 <= self.label_smoothing < 1.0, "must be in [0, 1)"),
            ("eval_every", self.eval_every >= 0, "must be 0 (only at the end) or more"),
            ("eval_limit", self.eval_limit is None or self.eval_limit >= 1, "must be 1 or more"),
            ("save_every", self.save_every >= 0, "must be 0 (only on Ctrl-C) or more"),
            ("log_every", self.log_every >= 1, "must be 1 or more"),
            ("seed", 0 <= self.seed <= MAX_SEED, f"must be a whole number from 0 to {MAX_SEED}"),
            *[(name, getattr(self, name) is None or getattr(self, name) <= MAX_COUNT, f"must be at most {MAX_COUNT}")
              for name in _COUNTS],
        ])
        if self.fsdp and not distributed.launched():
            raise UserError("--fsdp: shards the model across several processes; start them with torchrun "
                            "--nproc_per_node N (see docs/distributed.md)")

    def flat(self) -> dict:
        """The settings as one flat dict (the adapter's shape first), as the training summary and checkpoints
        record them."""
        adapter = {f.name: getattr(self.adapter, f.name) for f in fields(AdapterConfig)}
        return {**adapter, **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "adapter"}}


@dataclass(frozen=True)
class DataConfig:
    """Where the tweets come from (`spec`, see data.py) and, for tables, which columns hold what."""

    spec: str | None = field(default=None, metadata={
        "flag": "--data", "help": "'tweet_eval' (Hub), a TweetEval folder, a CSV/JSONL/Parquet file or folder, or "
        "'train=a.csv,test=b.csv'", "default_help": "$DORATWEET_DATA, else tweet_eval"})
    text_column: str = field(default="text", metadata={"help": "text column of CSV/JSONL/Parquet data"})
    label_column: str = field(default="label", metadata={"help": "label column of CSV/JSONL/Parquet data"})
    id_column: str | None = field(default="id", metadata={
        "help": "column whose values must be unique when the table has it; '' for no check"})
    skip_bad_rows: bool = field(default=False, metadata={
        "help": "drop bad rows and say how many, instead of stopping at the first"})

    def __post_init__(self):
        if self.id_column == "":
            object.__setattr__(self, "id_column", None)

    def load_options(self) -> dict:
        """The keyword arguments of data.load_data besides the spec."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "spec"}


@dataclass(frozen=True)
class Round:
    """One round of training: a schedule of its own (warm-up, then decay) on the next `tweets` train tweets (None:
    the rest), starting from the previous round's best adapter."""

    tweets: int | None
    train: TrainConfig


@dataclass(frozen=True)
class RunConfig:
    """Everything `doratweet run` and `doratweet train` need. `train` evaluates nothing on the test split; its
    limits stay None."""

    out: Path
    model: str  # the --model: 'smollm2-135m', a Hub id, a folder or a .gguf
    rounds: tuple[Round, ...] = (Round(None, TrainConfig()),)
    data: DataConfig = DataConfig()
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    init_adapter: Path | None = None  # an adapter folder to train further; its shape is in every round's config
    train_skip: int = 0  # train tweets left out first
    train_limit: int | None = None  # then train on this many at most
    test_limit: int | None = None
    generate_limit: int | None = None  # generation is slower than scoring: evaluated on fewer tweets
    eval_batch_size: int = 32  # test tweets per evaluation batch
    eval_bf16: bool | None = None  # None: bf16 where it is fast (hardware.bf16_is_fast)
    preset: str | None = None  # the preset's name, recorded in metrics.json
    report_to: str = "none"  # "tensorboard": training curves also as TensorBoard events (train.tensorboard_writer)
    trust_remote_code: bool = False
    overwrite: bool = False
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        if self.overwrite and self.resume:
            raise UserError("--overwrite and --resume: choose one (start again, or continue the run in --out)")
        if self.report_to not in ("none", "tensorboard"):
            raise UserError(f"--report-to {self.report_to}: choose none or tensorboard")
        if self.report_to == "tensorboard" and not any(map(importlib.util.find_spec, ("tensorboard", "tensorboardX"))):
            raise UserError("--report-to tensorboard: needs the tensorboard package; pip install tensorboard")

    @property
    def train(self) -> TrainConfig:
        """The first round's training settings (the only round's, for `doratweet train`)."""
        return self.rounds[0].train


@dataclass(frozen=True)
class Preset:
    """How much data a run uses (`None`: the whole split) and how it trains."""

    name: str
    train_limit: int | None
    test_limit: int | None
    generate_limit: int | None
    rounds: tuple[Round, ...]  # rounds before the last are kept in out/round-N


_ALL_LAYERS = TrainConfig(AdapterConfig(dropout=0.0), epochs=1, batch_size=16, lr=5e-4, eval_every=0, eval_limit=500)
# Adapters on the top 15 of SmolLM2's 30 layers, the 15 below cached (frozen_layers.py): chosen by the rule of
# docs/experiments.md ("Choosing the presets by validation"): the best validation macro-F1 among the configurations
# whose `make demo` fits 10 minutes on either CPU kind. All 30 layers score higher (0.675 against 0.651 on all 2,000
# validation tweets) but take 5.9 minutes to train here instead of 4.0, too slow for the AMD machine.
_QUICK = replace(_ALL_LAYERS, adapter=replace(_ALL_LAYERS.adapter, layers="top:15"))
_BEST = replace(_ALL_LAYERS, eval_every=125, save_every=125, eval_limit=1000)
PRESETS = {
    # Sized for 2 CPU cores and `make demo` within 10 minutes with the embedded 135M model, set-up included.
    # lr chosen on validation (500 tweets): 5e-4 -> macro-F1 0.622, 1e-3 -> 0.616 (docs/results.md).
    # Dropout 0: on CPU the dropout masks cost ~12% of a step, and 188 steps are too few to overfit.
    "quick": Preset("quick", train_limit=3000, test_limit=1000, generate_limit=200, rounds=(Round(None, _QUICK),)),
    # The recipe of the adapter that ships with doratweet, the best of the configurations measured so far
    # (docs/experiments.md, runs 8 and 9): quick's settings on all 30 layers, validated on 1,000 validation tweets
    # every 125 steps with the best kept, on the first 20,000 train tweets; then a second round from that adapter on
    # the other 25,615 (evaluated every 200 steps, as run 9 was). Whole test split. ~2 h 20 min on 2 CPU cores.
    "best": Preset("best", train_limit=None, test_limit=None, generate_limit=2000,
                   rounds=(Round(20_000, _BEST), Round(None, replace(_BEST, eval_every=200, save_every=200)))),
    "full": Preset("full", train_limit=None, test_limit=None, generate_limit=None,
                   rounds=(Round(None, TrainConfig(AdapterConfig(dropout=0.05), epochs=1, batch_size=64, lr=2e-4,
                                                   eval_every=200)),)),
}


def default_preset() -> str:
    import torch

    return "full" if torch.cuda.is_available() else "quick"


def with_options(train: TrainConfig, adapter_options: dict, train_options: dict) -> TrainConfig:
    """`train` with the options a user gave (AdapterConfig and TrainConfig fields) in place of its own values."""
    return replace(train, adapter=replace(train.adapter, **adapter_options), **train_options)


# The fields of AdapterConfig that fix an adapter's shape; an --init-adapter brings its own.
ADAPTER_SHAPE = ("method", "rank", "alpha", "targets", "use_rslora", "layers")


def with_shape_of(train: TrainConfig, saved: AdapterConfig) -> TrainConfig:
    """`train` with the shape of a saved adapter (to train it further); the dropout stays this run's."""
    return replace(train, adapter=replace(saved, dropout=train.adapter.dropout))
