"""The search space of `doratweet tune`: a YAML file that names options of `doratweet train` and what each may be.

    lr: {low: 1.0e-4, high: 2.0e-3, log: true}     a range (floats; ints for integer options, with an optional step)
    rank: {choices: [8, 16, 32]}                   a list to choose from (any option, the system prompt included)
    layers: top:8                                  a fixed value

Keys are the option names of `doratweet train` without the dashes (`weight-decay`, `weight_decay`, `rslora` and
`use_rslora` all work), plus `system_prompt`. The options that decide how a trial is run rather than what is trained
(validation, checkpoints, logging, --fsdp) are set by `tune` itself and cannot be searched. Every value is checked
here, with the option's own checks, so a bad file stops before any trial with one line naming the key.
"""

from __future__ import annotations

import argparse
import json
import math
import typing
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable

from .adapters.config import AdapterConfig
from .config import RunConfig, TrainConfig
from .errors import UserError

# Set by `tune` for every trial (how it is validated, checkpointed and logged), or not per trial (--fsdp and
# --no-cache-frozen: how a trial runs, not what it learns).
_NOT_SEARCHED = ("eval_every", "eval_limit", "save_every", "log_every", "fsdp", "eval_batch_size", "cache_frozen")
SYSTEM_PROMPT = "system_prompt"


@dataclass(frozen=True)
class Option:
    """An option a search space may set: where it lives (the adapter's shape, the training, or the run) and its type.
    An option the command line reads from text with a function of its own (--targets q_proj,v_proj, --train-precision
    auto) is written as that text in the space, and read by the same function when a trial applies it."""

    field: str
    owner: str  # "adapter", "train" or "run"
    kind: type  # int, float, bool or str
    parse: Callable[[str], object] | None = None

    def value(self, written):
        return self.parse(written) if self.parse is not None else written


def searchable_options() -> dict[str, Option]:
    """Every key a search space may use, under its field name and under its option name."""
    found = {}
    for owner, config in (("adapter", AdapterConfig()), ("train", TrainConfig())):
        hints = typing.get_type_hints(type(config))
        for f in fields(config):
            if "help" not in f.metadata or f.name in _NOT_SEARCHED or f.name == "adapter":
                continue
            kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
            parse = f.metadata.get("parse")
            option = Option(f.name, owner, str if parse or kind not in (int, float, bool) else kind, parse)
            found[f.name] = option
            found[f.metadata.get("flag", "--" + f.name).removeprefix("--").replace("-", "_")] = option
    found[SYSTEM_PROMPT] = Option(SYSTEM_PROMPT, "run", str)
    return found


@dataclass(frozen=True)
class Dimension:
    """One key of the space: a fixed `value`, `choices`, or a range `low`..`high` (log-scaled, or in `step`s)."""

    key: str
    option: Option
    value: object = None
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    @property
    def fixed(self) -> bool:
        return self.choices is None and self.low is None

    def suggest(self, trial):
        """This dimension's value for an Optuna trial."""
        if self.fixed:
            return self.value
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.option.kind is int:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def canonical(self) -> dict:
        """What this dimension means, as JSON: a study compares it, not the file's text (comments may change)."""
        return {"key": self.key, "value": self.value, "choices": self.choices, "low": self.low, "high": self.high,
                "log": self.log, "step": self.step}

    def describe(self) -> str:
        if self.fixed:
            return repr(self.value)
        if self.choices is not None:
            return "one of " + ", ".join(map(repr, self.choices))
        scale = ", log scale" if self.log else f", step {self.step}" if self.step else ""
        return f"{self.low} to {self.high}{scale}"


@dataclass(frozen=True)
class SearchSpace:
    path: Path
    text: str  # the file as read: recorded with the study, so a changed file is noticed on --resume
    dimensions: tuple[Dimension, ...]

    def suggest(self, trial) -> dict:
        """A value for every key, fixed ones included, sampled by the trial."""
        return {d.key: d.suggest(trial) for d in self.dimensions}

    @property
    def fixed(self) -> dict:
        return {d.key: d.value for d in self.dimensions if d.fixed}

    def canonical(self) -> str:
        return json.dumps([d.canonical() for d in self.dimensions], sort_keys=True)

    def fields(self) -> set[str]:
        """The config fields the space sets."""
        return {d.option.field for d in self.dimensions}

    def apply(self, values: dict, run: RunConfig) -> RunConfig:
        """`run` with these values of the space's keys (its only round changed)."""
        return apply_values(self.dimensions, values, run)


def apply_values(dimensions, values: dict, run: RunConfig) -> RunConfig:
    by_owner = {"adapter": {}, "train": {}, "run": {}}
    for d in dimensions:
        by_owner[d.option.owner][d.option.field] = d.option.value(values[d.key])
    train = run.train
    train = replace(train, adapter=replace(train.adapter, **by_owner["adapter"]), **by_owner["train"])
    return replace(run, rounds=(replace(run.rounds[0], train=train),), **by_owner["run"])


def read_search_space(path: str | Path, base: RunConfig) -> SearchSpace:
    """The space in the YAML file `path`, each value checked against `base` (the trial's other settings)."""
    import yaml

    path = Path(path)
    where = f"--space {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{where}: no such file; write the search space in YAML (see docs/experiments.md, "
                        "\"doratweet tune\")") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{where}: cannot be read as UTF-8 text ({err.__class__.__name__})") from None
    try:
        tree = yaml.load(text, Loader=_unique_key_loader())
    except _DuplicateKey as err:
        raise UserError(f"{where}: line {err.line}: {err.key} is given twice; keep one") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        raise UserError(f"{where}: {line}not valid YAML ({getattr(err, 'problem', None) or 'syntax'})") from None
    if not isinstance(tree, dict) or not tree:
        raise UserError(f"{where}: must be a YAML mapping of options to values, ranges or choices, e.g. "
                        "'lr: {low: 1.0e-4, high: 1.0e-3, log: true}'")
    options = searchable_options()
    dimensions, seen = [], {}
    for key, spec in tree.items():
        option = options.get(str(key).replace("-", "_"))
        if option is None:
            known = sorted({name for name, o in options.items() if name == o.field or o.field == "use_rslora"})
            raise UserError(f"{where}: {key}: not an option tune can search (searchable: {', '.join(known)})")
        if option.field in seen:
            raise UserError(f"{where}: {key}: the same option as {seen[option.field]}; keep one of them")
        seen[option.field] = key
        dimensions.append(_dimension(where, str(key), option, spec))
    space = SearchSpace(path, text, tuple(dimensions))
    _check_every_value(where, space, base)
    return space


class _DuplicateKey(Exception):
    def __init__(self, key, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


def _unique_key_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently)."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return Loader


def _dimension(where: str, key: str, option: Option, spec) -> Dimension:
    at = f"{where}: {key}"
    if not isinstance(spec, dict):
        return Dimension(key, option, value=_typed(at, option, spec))
    unknown = set(spec) - {"choices", "low", "high", "log", "step"}
    if unknown:
        raise UserError(f"{at}: unknown key {sorted(map(str, unknown))[0]!r} (use choices, or low, high, log, step)")
    if "choices" in spec:
        if set(spec) != {"choices"}:
            raise UserError(f"{at}: give either choices or low/high, not both")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{at}: choices must be a non-empty list, e.g. choices: [8, 16, 32]")
        typed = tuple(_typed(f"{at}: choice {i + 1}", option, c) for i, c in enumerate(choices))
        if len(set(typed)) != len(typed):
            raise UserError(f"{at}: a choice is listed twice")
        return Dimension(key, option, choices=typed)
    if option.kind not in (int, float):
        raise UserError(f"{at}: a {option.kind.__name__} option takes choices: [...] or one value, not a range")
    if "low" not in spec or "high" not in spec:
        raise UserError(f"{at}: a range needs both low and high")
    low, high = (_typed(f"{at}: {name}", option, spec[name]) for name in ("low", "high"))
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{at}: log must be true or false")
    step = None if spec.get("step") is None else _typed(f"{at}: step", option, spec["step"])
    if not low < high:
        raise UserError(f"{at}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise UserError(f"{at}: a log-scaled range needs low above 0")
    if step is not None and (step <= 0 or log):
        raise UserError(f"{at}: step must be positive, and cannot go with log: true")
    if step is not None and step > high - low:
        raise UserError(f"{at}: step {step} is wider than the range {low} to {high}; give a smaller step")
    return Dimension(key, option, low=low, high=high, log=log, step=step)


def _typed(at: str, option: Option, value):
    """`value` as the option's type. YAML reads 1e-4 (no dot) as a string; it is taken as the number it means."""
    kind = option.kind
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if math.isfinite(number):
                    return number
    elif isinstance(value, str) and value.strip():
        return value
    elif option.parse is not None and isinstance(value, list) and value and all(
            isinstance(v, str) and v.strip() and "," not in v for v in value):
        return ",".join(value)  # targets: [q_proj, v_proj] means --targets q_proj,v_proj
    wanted = {bool: "true or false", int: "a whole number", float: "a number", str: "a non-empty text"}[kind]
    raise UserError(f"{at}: {value!r} is not {wanted}")


def _candidates(d: Dimension) -> tuple:
    return d.choices or ((d.value,) if d.fixed else (d.low, d.high))


def _check_every_value(where: str, space: SearchSpace, base: RunConfig) -> None:
    """Each value, and each end of each range, through the options' own checks (with the others at `base`'s)."""
    for d in space.dimensions:
        for value in _candidates(d):
            try:
                apply_values([d], {d.key: value}, base)
            except (UserError, ValueError, argparse.ArgumentTypeError) as err:
                raise UserError(f"{where}: {d.key}: {value!r}: {err}") from None


def check_against_model(space: SearchSpace, base: RunConfig, model) -> None:
    """Every adapter shape the space allows against the base model: targets it has, layers it has, a rank its layers
    take. Checked once before any trial, so that a bad value stops the study instead of failing every trial."""
    from .adapters import check_adapter_fits

    for d in space.dimensions:
        if d.option.owner != "adapter":
            continue
        for value in _candidates(d):
            try:
                check_adapter_fits(model, apply_values([d], {d.key: value}, base).train.adapter)
            except UserError as err:
                raise UserError(f"--space {space.path}: {d.key}: {value!r}: {err}") from None
