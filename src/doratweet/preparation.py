"""What `doratweet run` and `doratweet train` do before training, in the same order for both: check --out, load
the data, load the base model, check the adapter fits it. Every check that can fail runs before the first file
is written (run_folder.start_out_dir comes after)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from . import LABELS, distributed
from .adapters import AdapterNotes, check_adapter_fits, target_module_names
from .config import RunConfig
from .data import Split, load_data, resolve_data_spec
from .errors import UserError
from .models import BaseModel, load_base_model
from .prompts import PromptFormat, make_prompt_format
from .run_folder import CARD_FILE, check_out_dir, is_own_card, refuse_to_replace

log = logging.getLogger("doratweet")


@dataclass(frozen=True)
class TrainingData:
    splits: dict[str, Split]
    train: Split  # the train tweets after --train-skip and --train-limit


def check_out_and_load_data(config: RunConfig, needed: tuple[str, ...], writes_card: bool = False) -> TrainingData:
    """Refuse an --out that would lose files or cannot resume, then load the data and the splits `needed`."""
    if distributed.is_main_process():
        check_out_dir(config.out, config.overwrite, config.resume)
        if writes_card and config.resume:  # the card is written at the very end: one that is not ours is refused now
            refuse_to_replace(config.out / CARD_FILE, is_own_card, "the model card")
    splits = load_data(config.data.spec, **config.data.load_options())
    for name in needed:
        if name not in splits:
            raise UserError(f"--data {resolve_data_spec(config.data.spec)}: has no {name} split "
                            f"(found: {', '.join(splits)})")
    return TrainingData(splits, splits["train"].skip(config.train_skip).head(config.train_limit))


@dataclass(frozen=True)
class PreparedModel:
    base: BaseModel
    fmt: PromptFormat
    notes: AdapterNotes  # written beside every adapter the run saves


def load_model_for_training(config: RunConfig) -> PreparedModel:
    """The base model on this process's device, its prompt format, and the notes its adapters will carry. Targets
    it lacks or a rank its layers cannot take fail now, not after an evaluation (an --init-adapter brings its own
    rank, checked when it loads)."""
    log.info("loading base model %s", config.model)
    with distributed.main_process_first():
        base = load_base_model(config.model, device=distributed.process_device(),
                               trust_remote_code=config.trust_remote_code)
    for round_ in config.rounds:
        target_module_names(base.model, round_.train.adapter.targets)
        if config.init_adapter is None:  # an --init-adapter brings its own rank
            check_adapter_fits(base.model, round_.train.adapter)
    notes = AdapterNotes(system_prompt=config.system_prompt, model_spec=config.model, labels=tuple(LABELS))
    if config.init_adapter is not None:  # where the run started, and on which tweets
        notes = replace(notes, init_adapter=str(config.init_adapter), train_skip=config.train_skip)
    return PreparedModel(base, make_prompt_format(base.tokenizer, config.system_prompt), notes)
