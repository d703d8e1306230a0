"""The training loop, in plain PyTorch: AdamW on adapter parameters, warm-up + cosine, accumulation,
clipping, length-bucketed batches, periodic validation keeping the best adapter, checkpoints and resume.

`train` reads top to bottom: `setup` (adapters, optimizer, schedule, data), resume from a checkpoint, `fit` (one
`train_step` per optimizer step, then logging, validation and checkpoints on schedule), a last `validate`, and
the best adapter back in the model. Checkpoints and Ctrl-C live in checkpoints.py.

Under torchrun the same loop runs in every process (docs/distributed.md): each builds the same global batches
and takes its slice of each, gradients are averaged by DDP (or FSDP with `fsdp=True`), and rank 0 alone
validates and writes files. With the same --batch-size it follows the single-process trajectory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import LABELS, distributed
from .adapters import (
    AdapterNotes,
    adapter_parameters,
    add_adapters,
    check_adapter_fits,
    copy_adapter_tensors,
    get_adapter_config,
    note_on_adapter,
    save_adapter,
)
from .adapters.inject import decoder_layers
from .adapters.peft_format import WEIGHTS_FILE
from .checkpoints import (
    checkpoint_on_interrupt,
    last_checkpoint_note,
    load_training_checkpoint,
    save_training_checkpoint,
)
from .config import TrainConfig
from .data import Split
from .errors import UserError
from .evaluate import (
    classification_metrics,
    common_prefix,
    inference_model,
    prefix_cache,
    probabilities_from_scores,
    score_labels,
    split_model,
)
from .frozen_layers import FrozenLayers, frozen_layers
from .hardware import bf16_training_pays, fp32_or_wider
from .models import cache_root
from .prompts import IGNORE_INDEX, PromptFormat, training_example
from .run_folder import ADAPTER_DIR, CHECKPOINT_DIR, LOG_FILE, TENSORBOARD_DIR
from .stopping import StopRequests

log = logging.getLogger("doratweet")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    best_val_macro_f1: float = -1.0
    best_step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    unlogged_losses: list[float] = field(default_factory=list)  # since the last log line (kept for resume)


def encode_split(fmt: PromptFormat, split: Split) -> list[tuple[list[int], list[int]]]:
    """Prompt + answer ids and loss targets for every tweet, tokenised once."""
    prompts = fmt.prompt_ids(split.texts)
    return [training_example(p, fmt.answer_ids[y]) for p, y in zip(prompts, split.labels)]


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """A shuffled epoch in batches of similar length: shuffle, sort within windows of 64 batches, cut,
    shuffle the batches. Deterministic in (seed, epoch), which is what makes resume exact."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 64
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def right_pad(examples, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (seq, tgt) in enumerate(examples):
        ids[row, : len(seq)] = torch.tensor(seq)
        targets[row, : len(tgt)] = torch.tensor(tgt)
        mask[row, : len(seq)] = 1
    return ids.to(device), targets.to(device), mask.to(device)


def answer_loss(model, ids, targets, mask, prefix: list[int] = (), label_smoothing: float = 0.0,
                answer_tokens: float | None = None, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy on the answer tokens only; the vocabulary projection runs only at those positions,
    which skips most of the output head's cost (49k words x every prompt token for SmolLM2).

    `ids` hold what follows the shared `prefix` (computed once for the batch, see `prefix_cache`). The loss is
    the mean over the batch's answer tokens; with `answer_tokens` it is their sum divided by that count instead,
    so that the slices of one global batch on several ranks add up to exactly the whole batch's mean. With
    `row_weights` (one per tweet: --class-weighted) the mean is weighted, and `answer_tokens` is the batch's total
    weight."""
    decoder, head = split_model(model)
    cache = prefix_cache(decoder, list(prefix), ids.shape[0], ids.device)
    if cache is None:
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    else:
        n = len(prefix)
        full_mask = torch.cat([torch.ones(ids.shape[0], n, dtype=mask.dtype, device=ids.device), mask], dim=1)
        positions = n + torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        hidden = decoder(input_ids=ids, attention_mask=full_mask, position_ids=positions, past_key_values=cache,
                         use_cache=True).last_hidden_state
    return answer_token_loss(head, hidden, targets, label_smoothing, answer_tokens, row_weights)


def frozen_answer_loss(model, frozen: FrozenLayers, batch: list[int], targets, mask, label_smoothing: float = 0.0,
                       row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """`answer_loss` with the frozen bottom's output read from its cache (frozen_layers.py): only the layers above
    it run, forward and backward."""
    dtype = next(frozen.top.parameters()).dtype
    hidden = frozen.batch(batch, mask.device, dtype)
    cache = frozen.top_prefix_cache(len(batch), dtype)
    n, width = len(frozen.prefix), hidden.shape[1]
    full_mask = torch.cat([torch.ones(len(batch), n, dtype=mask.dtype, device=mask.device), mask], dim=1)
    positions = n + torch.arange(width, device=mask.device).expand(len(batch), -1)
    hidden = frozen.top(inputs_embeds=hidden, attention_mask=full_mask, position_ids=positions,
                        past_key_values=cache, use_cache=cache is not None).last_hidden_state
    return answer_token_loss(model.get_output_embeddings(), hidden, targets, label_smoothing, row_weights=row_weights)


def answer_token_loss(head, hidden, targets, label_smoothing: float, answer_tokens: float | None = None,
                      row_weights: torch.Tensor | None = None):
    """Cross-entropy of the answer tokens, the vocabulary projection run at their positions only; each tweet's
    tokens weighted by `row_weights` when given (a weighted mean, as cross_entropy's own `weight` makes one)."""
    predicts = targets[:, 1:] != IGNORE_INDEX  # position t predicts token t+1
    logits = fp32_or_wider(head(hidden[:, :-1][predicts].to(head.weight.dtype)))
    if row_weights is not None:
        token_weights = row_weights.to(logits.dtype)[:, None].expand_as(predicts)[predicts]
        losses = F.cross_entropy(logits, targets[:, 1:][predicts], label_smoothing=label_smoothing, reduction="none")
        return (losses * token_weights).sum() / (token_weights.sum() if answer_tokens is None else answer_tokens)
    if answer_tokens is None:
        return F.cross_entropy(logits, targets[:, 1:][predicts], label_smoothing=label_smoothing)
    total = F.cross_entropy(logits, targets[:, 1:][predicts], label_smoothing=label_smoothing, reduction="sum")
    return total / answer_tokens


class AnswerLoss(torch.nn.Module):
    """`answer_loss` as a module. DDP synchronises the gradients of what runs inside the forward of the module it
    wraps, and answer_loss calls the decoder and the output head separately, so DDP wraps this."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, targets, mask, prefix, label_smoothing, answer_tokens, row_weights=None):
        return answer_loss(self.model, ids, targets, mask, prefix, label_smoothing, answer_tokens, row_weights)


def rank_slice(batch: list[int], rank: int, world: int) -> tuple[list[int], float]:
    """Rank `rank`'s contiguous share of a global batch (shares differ by one tweet at most) and its weight.

    A rank whose share is empty (a last batch with fewer tweets than ranks) runs the batch's first tweet with
    weight 0: every rank must run a forward and backward for the gradient collectives to line up."""
    start, end = len(batch) * rank // world, len(batch) * (rank + 1) // world
    if start == end:
        return batch[:1], 0.0
    return batch[start:end], 1.0


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def validate(model, fmt: PromptFormat, prompts: list[list[int]], labels: list[int], batch_size: int,
             sharded: bool = False, bf16: bool = False) -> dict:
    """Validation macro-F1 etc., scored on a merged copy (bf16 where fast) so training's weights stay as they are.

    A model sharded by FSDP cannot be merged on one rank: every rank scores with the training model itself
    (its layers gather their weights as they run), in eval mode."""
    if sharded:
        model.eval()
        with torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=bf16):
            scores = score_labels(model, fmt, prompts, batch_size)
        model.train()
    else:
        scores = score_labels(inference_model(model, next(model.parameters()).device), fmt, prompts, batch_size)
    return classification_metrics(labels, probabilities_from_scores(scores).argmax(axis=1))



@dataclass(frozen=True)
class TrainingData:
    """The training tweets, tokenised once: prompt + answer ids after the prompt's part that every tweet shares
    (`prefix`, computed once per batch, see evaluate.prefix_cache), and what batching and the loss need of them."""

    examples: list[tuple[list[int], list[int]]]
    prefix: list[int]
    lengths: list[int]
    answer_counts: list[int]  # loss tokens of each tweet
    labels: list[int]

    @classmethod
    def of(cls, fmt: PromptFormat, split: Split, share_prefix: bool) -> TrainingData:
        examples = encode_split(fmt, split)
        prefix = common_prefix(fmt, [ids for ids, _ in examples]) if share_prefix else []
        examples = [(ids[len(prefix) :], targets[len(prefix) :]) for ids, targets in examples]
        return cls(examples, prefix, [len(ids) for ids, _ in examples],
                   [sum(t != IGNORE_INDEX for t in targets[1:]) for _, targets in examples], list(split.labels))

    def class_weights(self) -> list[float]:
        """--class-weighted: each label's weight, inversely proportional to its share of the training tweets and
        1 on average over them ("balanced", as scikit-learn calls it), so a rare label counts as much as a common
        one in the loss, as it does in macro-F1."""
        counts = np.bincount(self.labels, minlength=len(LABELS))
        return [len(self.labels) / (len(LABELS) * n) if n else 0.0 for n in counts]


@dataclass
class Session:
    """What one call of `train` works with; made by `setup`, changed only by the optimizer steps and `state`."""

    model: torch.nn.Module
    fmt: PromptFormat
    config: TrainConfig
    notes: AdapterNotes
    out_dir: Path
    base_model_id: str | None
    device: torch.device
    bf16: bool
    params: list[torch.nn.Parameter]  # under FSDP: this rank's shards
    loss_module: torch.nn.Module | None  # several ranks: computes this rank's share of a batch's loss
    data: TrainingData
    steps_per_epoch: int
    total_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    validation: tuple[list[list[int]], list[int]] | None  # prompt ids and labels
    frozen: FrozenLayers | None = None  # the cached output of the layers below the adapters (--layers)
    half_weights: HalfWeights | None = None  # bf16 training on a CPU
    class_weights: torch.Tensor | None = None  # --class-weighted: the loss weight of each label
    state: TrainState = field(default_factory=TrainState)
    log_file: object = None  # rank 0's train_log.jsonl, open while training
    tensorboard: object = None  # rank 0's TensorBoard writer (--report-to tensorboard), open while training
    on_validation: Callable[[int, dict], None] | None = None  # the caller's hook (tune: report, maybe prune)
    updating: bool = False  # True while the weights, optimizer and schedule are between two steps' states
    stopping_together: bool = False  # every rank agreed to stop after this step (Ctrl-C on any of them)

    @property
    def checkpoint(self) -> Path:
        return self.out_dir / CHECKPOINT_DIR

    def settings(self) -> dict:
        """The training settings as checkpoints record them: the config, and the notes a resume must share."""
        notes = {k: v for k, v in asdict(self.notes).items() if v is not None and k != "base_fingerprint"}
        return {**self.config.flat(), "extra": json.loads(json.dumps(notes))}


def train(model, fmt: PromptFormat, train_split: Split, val_split: Split | None, config: TrainConfig,
          out_dir: str | os.PathLike, *, notes: AdapterNotes = AdapterNotes(), resume: bool = False,
          progress: bool = True, base_model_id: str | None = None, on_step: Callable[[int], None] | None = None,
          on_validation: Callable[[int, dict], None] | None = None, report_to: str = "none") -> dict:
    """Fine-tune adapters on `train_split`; the best adapter (by validation macro-F1) ends in out_dir/adapter
    and in the model, with `notes` beside it. A model without adapters gets new ones of `config.adapter`'s shape.
    Returns a summary of what was done.

    `on_step(step)` is called after every optimizer step, `on_validation(step, metrics)` after every validation
    (an exception from either stops training; the best adapter so far is kept). `report_to="tensorboard"` writes
    the lines of train_log.jsonl to out_dir/tensorboard as well.

    Inside a process group (see `distributed.process_group`) every rank calls this with the same arguments;
    rank 0 alone writes out_dir, and, with FSDP, the model stays sharded across the ranks afterwards."""
    session = setup(model, fmt, train_split, val_split, config, Path(out_dir), notes, base_model_id, progress)
    session.on_validation = on_validation
    log_path = session.out_dir / LOG_FILE
    if resume:
        progress_saved, log_bytes = load_training_checkpoint(session.checkpoint, model, session.optimizer,
                                                             session.scheduler, session.settings())
        session.state = TrainState(**progress_saved)
        if distributed.is_main_process() and log_path.is_file() and log_path.stat().st_size > log_bytes:
            os.truncate(log_path, log_bytes)  # drop lines logged after the checkpoint: they are redone
    if distributed.is_main_process():
        session.log_file = log_path.open("a" if resume else "w")
        if report_to == "tensorboard":  # a resumed run drops what an earlier one logged after its checkpoint
            session.tensorboard = tensorboard_writer(session.out_dir / TENSORBOARD_DIR,
                                                     session.state.step + 1 if resume else None)
    try:
        with checkpoint_on_interrupt(session.checkpoint, lambda: save(session), lambda: safe_to_save(session)), \
                (session.half_weights.held() if session.half_weights else nullcontext()):
            fit(session, progress, on_step)
            validate_and_keep_best(session)
    finally:
        if session.log_file is not None:
            session.log_file.close()
        if session.tensorboard is not None:
            session.tensorboard.close()
    model.eval()
    if session.validation is None:
        write_adapter(session)
    elif session.state.best_step != session.state.step:  # an earlier validation was better: bring it back
        load_trained_adapter(model, session.out_dir / ADAPTER_DIR)
    return summary(session, len(train_split))


def tensorboard_writer(folder: Path, purge_step: int | None):
    """TensorBoard's writer (torch's own, which needs the tensorboard package; else tensorboardX), as the Hugging
    Face Trainer finds it. `purge_step`: events from that step on, left by a run stopped after its checkpoint, are
    hidden."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise UserError("--report-to tensorboard: needs the tensorboard package; pip install tensorboard") from None
    return SummaryWriter(log_dir=str(folder), purge_step=purge_step)


class HalfWeights:
    """bf16 training on a CPU. Autocast alone casts every frozen weight to bf16 again on every call, forward and
    backward, which cost more than the bf16 matmuls saved; so while training, the frozen weight matrices of the
    decoder layers are held in bf16 (adapters, norms, embeddings and the output head stay fp32), and attention runs
    eagerly, since the CPU's bf16 SDPA backward took 4x its fp32 time (docs/performance.md, "Training
    precision"). Validation and everything after training see the model's own fp32 weights and attention: both
    copies are kept, so switching costs nothing."""

    def __init__(self, model):
        self.model, self.attention = model, model.config._attn_implementation
        self.pairs = [(parameter, parameter.data, parameter.data.to(torch.bfloat16))
                      for layer in decoder_layers(model) for parameter in layer.parameters()
                      if not parameter.requires_grad and parameter.dim() == 2 and parameter.dtype == torch.float32]

    def use(self, half: bool) -> None:
        for parameter, full, bf16 in self.pairs:
            parameter.data = bf16 if half else full
        self.model.set_attn_implementation("eager" if half else self.attention)

    @contextmanager
    def held(self):
        self.use(True)
        try:
            yield
        finally:
            self.use(False)

    @contextmanager
    def paused(self):
        self.use(False)
        try:
            yield
        finally:
            self.use(True)


def setup(model, fmt: PromptFormat, train_split: Split, val_split: Split | None, config: TrainConfig, out_dir: Path,
          notes: AdapterNotes, base_model_id: str | None, progress: bool = True) -> Session:
    """Adapters (new ones unless the model has them), seeds, parallel wrappers, optimizer, schedule, the data, and
    the cached output of frozen layers below the adapters."""
    torch.manual_seed(config.seed)
    if get_adapter_config(model) is None:
        check_adapter_fits(model, config.adapter)
        add_adapters(model, config.adapter)
    if distributed.is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
    note_on_adapter(model, notes)
    device = adapter_parameters(model)[0].device
    if distributed.rank() > 0:  # the adapters start equal everywhere; dropout masks should not repeat across ranks
        torch.manual_seed(config.seed + 1_000_003 * distributed.rank())
    if config.fsdp:
        distributed.shard_decoder_layers(model, device)
    params = adapter_parameters(model)
    loss_module = None
    if distributed.active():  # DDP replicates the model and wraps the loss; an FSDP model syncs gradients itself
        loss_module = AnswerLoss(model) if config.fsdp else distributed.data_parallel(AnswerLoss(model), device)
    # FSDP gathers a layer's weights again for backward when the gradient reaches the layer's output; the shared
    # prefix pass hands its gradient on through the KV cache instead, so under FSDP each tweet runs whole.
    data = TrainingData.of(fmt, train_split, share_prefix=not config.fsdp)
    steps_per_epoch = max(1, math.ceil(len(data.examples) / config.batch_size) // config.grad_accum)
    total_steps = config.max_steps or max(1, round(steps_per_epoch * config.epochs))
    warmup = max(1, round(config.warmup_ratio * total_steps))
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup))
    validation = None
    if val_split is not None and len(val_split):
        val_split = val_split.head(config.eval_limit)
        validation = fmt.prompt_ids(val_split.texts), val_split.labels
    frozen = None
    if config.cache_frozen and config.adapter.layers != "all" and distributed.active():
        log.info("under torchrun the frozen layers run every step (their cache is built for one process)")
    elif config.cache_frozen and config.adapter.layers != "all":
        frozen = frozen_layers(model, data.prefix, [ids for ids, _ in data.examples], fmt.tokenizer.pad_token_id,
                               cache_root() / "frozen-layers", progress and distributed.is_main_process())
    bf16 = bf16_training_pays(device, next(model.parameters()).dtype) if config.bf16 is None else config.bf16
    half_weights = HalfWeights(model) if bf16 and device.type == "cpu" and not config.fsdp else None
    class_weights = torch.tensor(data.class_weights(), device=device) if config.class_weighted else None
    return Session(model, fmt, config, notes, out_dir, base_model_id, device, bf16, params, loss_module, data,
                   steps_per_epoch, total_steps, optimizer, scheduler, validation, frozen, half_weights, class_weights)


def fit(session: Session, progress: bool, on_step: Callable[[int], None] | None) -> None:
    """Optimizer steps until `total_steps`, with logging, validation and checkpoints on their schedules. Ctrl-C
    (on any rank) stops after the step under way."""
    state, config = session.state, session.config
    session.model.train()
    source = micro_batches_from(session, state.step)
    bar = tqdm(total=session.total_steps, initial=state.step, desc="training", unit="step",
               disable=not (progress and distributed.is_main_process()))
    started = time.perf_counter() - state.seconds
    window = LogWindow(state.unlogged_losses)
    try:
        with StopRequests() as stop_requests:
            while state.step < session.total_steps:
                step_losses, tokens = train_step(session, source)
                state.tokens += tokens
                state.seconds = time.perf_counter() - started
                window.add(step_losses, tokens)
                bar.update(1)
                if state.step % config.log_every == 0 or state.step == session.total_steps:
                    line = window.line(session)
                    log_line(session, line)
                    bar.set_postfix(loss=f"{line['loss']:.4f}", lr=f"{line['lr']:.2e}", tok_s=f"{line['tokens_per_s']:.0f}")
                    window = LogWindow([])
                    state.unlogged_losses = window.losses
                if config.eval_every and state.step % config.eval_every == 0 and state.step < session.total_steps:
                    validate_and_keep_best(session)
                if config.save_every and state.step % config.save_every == 0:
                    save(session)
                if on_step is not None:
                    on_step(state.step)
                if distributed.any_process(stop_requests.pressed):
                    session.stopping_together = True
                    stop_requests.stop()
    finally:
        bar.close()


def train_step(session: Session, source: Iterator[list[int]]) -> tuple[list[float], int]:
    """One optimizer step over `grad_accum` micro-batches; returns their mean losses and the tokens trained on."""
    config, data = session.config, session.data
    session.optimizer.zero_grad(set_to_none=True)
    losses, tokens = [], 0
    for micro in range(config.grad_accum):
        batch = next(source)
        with distributed.gradient_sync(session.loss_module, enabled=micro == config.grad_accum - 1):
            loss, loss_value = micro_batch_loss(session, batch)
            losses.append(loss_value)
            stop_if_not_finite(session, loss_value, "loss")
            (loss / config.grad_accum).backward()
        tokens += sum(data.lengths[i] for i in batch) + len(data.prefix) * len(batch)
    grad_norm = distributed.clip_grad_norm(session.params, config.max_grad_norm)
    stop_if_not_finite(session, float(grad_norm), "gradient norm")
    session.updating = True
    session.optimizer.step()
    session.scheduler.step()
    session.state.step += 1
    session.updating = False
    return losses, tokens


def micro_batches_from(session: Session, step: int) -> Iterator[list[int]]:
    """The micro-batches of every optimizer step from `step` on, across epochs."""
    config, per_epoch = session.config, session.steps_per_epoch * session.config.grad_accum
    micro = step * config.grad_accum
    epoch = micro // per_epoch
    while True:
        batches = epoch_batches(session.data.lengths, config.batch_size, config.seed, epoch)[:per_epoch]
        yield from batches[micro - epoch * per_epoch :]
        micro = (epoch + 1) * per_epoch
        epoch += 1


def micro_batch_loss(session: Session, batch: list[int]) -> tuple[torch.Tensor, float]:
    """The loss to backpropagate for one (global) micro-batch, and the batch's mean answer-token loss."""
    data, device, config = session.data, session.device, session.config
    pad = session.fmt.tokenizer.pad_token_id

    def row_weights(indices: list[int]) -> torch.Tensor | None:
        if session.class_weights is None:
            return None
        return session.class_weights[torch.tensor([data.labels[i] for i in indices], device=device)]

    if not distributed.active():
        ids, targets, mask = right_pad([data.examples[i] for i in batch], pad, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=session.bf16):
            if session.frozen is not None:
                loss = frozen_answer_loss(session.model, session.frozen, batch, targets, mask, config.label_smoothing,
                                          row_weights(batch))
            else:
                loss = answer_loss(session.model, ids, targets, mask, data.prefix, config.label_smoothing,
                                   row_weights=row_weights(batch))
        return loss, loss.item()
    world = distributed.world_size()
    mine, weight = rank_slice(batch, distributed.rank(), world)
    ids, targets, mask = right_pad([data.examples[i] for i in mine], pad, device)
    counts = [data.answer_counts[i] for i in batch]
    everyone = row_weights(batch)  # the whole batch's weight divides every rank's share
    total = sum(counts) if everyone is None else float((everyone * torch.tensor(counts, device=device)).sum())
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=session.bf16):
        share = weight * session.loss_module(ids, targets, mask, data.prefix, config.label_smoothing, total,
                                             row_weights(mine))
    # The ranks' shares add up to the batch's mean loss; DDP and FSDP average gradients over the ranks, so
    # each share's gradient counts `world` times to make that average the gradient of the batch's mean.
    return share * world, distributed.sum_over_processes(share)


class LogWindow:
    """The losses and tokens since the last line of train_log.jsonl."""

    def __init__(self, losses: list[float]):
        self.losses, self.tokens, self.started = losses, 0, time.perf_counter()

    def add(self, losses: list[float], tokens: int) -> None:
        self.losses.extend(losses)
        self.tokens += tokens

    def line(self, session: Session) -> dict:
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        state = session.state
        return {"step": state.step, "epoch": round(state.step / session.steps_per_epoch, 4),
                "loss": float(np.mean(self.losses)), "lr": session.scheduler.get_last_lr()[0],
                "tokens_per_s": round(rate, 1), "elapsed_s": round(state.seconds, 2)}


def log_line(session: Session, line: dict) -> None:
    if session.log_file is not None:
        session.log_file.write(json.dumps(line) + "\n")
        session.log_file.flush()
    if session.tensorboard is not None:  # the tags the Hugging Face Trainer uses: train/loss, eval/macro_f1, ...
        for key, value in line.items():
            if key != "step":
                tag = f"eval/{key.removeprefix('val_')}" if key.startswith("val_") else f"train/{key}"
                session.tensorboard.add_scalar(tag, value, line["step"])
        session.tensorboard.flush()


def stop_if_not_finite(session: Session, value: float, what: str) -> None:
    if math.isfinite(value):
        return
    hint = " (bf16 overflow?)" if session.bf16 else ""
    raise UserError(f"training stopped at step {session.state.step + 1}: the {what} became {value}{hint} and the "
                    f"adapter was not updated with it; {last_checkpoint_note(session.checkpoint)}; lower --lr and "
                    "run again")


def validate_and_keep_best(session: Session) -> None:
    """Validate (when there are validation tweets), log it, and write the adapter when it is the best so far."""
    if session.validation is None:
        return
    state, config = session.state, session.config
    metrics = None
    if distributed.is_main_process() or config.fsdp:  # under DDP the others wait for rank 0; under FSDP all score
        with session.half_weights.paused() if session.half_weights else nullcontext():
            metrics = validate(session.model, session.fmt, *session.validation, config.eval_batch_size,
                               sharded=config.fsdp, bf16=session.bf16)
    metrics = distributed.broadcast_from_main(metrics)
    log_line(session, {"step": state.step, "val_macro_f1": metrics["macro_f1"],
                       "val_macro_recall": metrics["macro_recall"], "val_accuracy": metrics["accuracy"]})
    if metrics["macro_f1"] > state.best_val_macro_f1:
        state.best_val_macro_f1, state.best_step = metrics["macro_f1"], state.step
        write_adapter(session)
    if session.on_validation is not None:  # after the best adapter is written: a hook that stops training keeps it
        session.on_validation(state.step, metrics)


def write_adapter(session: Session) -> None:
    with distributed.whole_adapter(session.model):
        if distributed.is_main_process():
            save_adapter(session.model, session.out_dir / ADAPTER_DIR, base_model_id=session.base_model_id)


def save(session: Session) -> None:
    log_bytes = session.log_file.tell() if session.log_file is not None else 0
    save_training_checkpoint(session.checkpoint, session.model, session.optimizer, session.scheduler,
                             asdict(session.state), session.settings(), log_bytes)


def safe_to_save(session: Session) -> bool:
    """Between steps the weights, optimizer and schedule agree: safe to resume from. Several ranks save only when
    they stopped together (saving is collective); a second Ctrl-C there stops without saving."""
    return not session.updating and (not distributed.active() or session.stopping_together)


def summary(session: Session, train_examples: int) -> dict:
    config, state, validated = session.config, session.state, session.validation is not None
    parallel = distributed.active()
    return {
        **config.flat(),
        "targets": config.adapter.targets if isinstance(config.adapter.targets, str) else list(config.adapter.targets),
        "steps": state.step,
        "train_examples": train_examples,
        "tokens": state.tokens,
        "seconds": round(state.seconds, 2),
        "device": session.device.type,
        "precision": ("bf16 (frozen weights held in bf16, adapters fp32)" if session.half_weights else
                      "bf16 autocast" if session.bf16 else "fp32"),
        "processes": distributed.world_size(),
        "parallelism": ("fsdp" if config.fsdp else "ddp") if parallel else "none",
        "trainable_parameters": sum(p.numel() for p in session.params),
        "total_parameters": sum(p.numel() for p in session.model.parameters()),
        "best_step": state.best_step if validated else state.step,
        "best_val_macro_f1": state.best_val_macro_f1 if validated else None,
    }


def load_trained_adapter(model, adapter_dir: Path, config: TrainConfig | None = None) -> None:
    """Put an adapter this run trained earlier (saved in `adapter_dir`) into the model, adding adapter layers of
    `config.adapter`'s shape first if the model has none, so that training can go on from it."""
    from safetensors.torch import load_file

    if get_adapter_config(model) is None:
        add_adapters(model, config.adapter)
    # Rank 0 reads (only its disk is sure to hold the run folder) and hands the tensors to the others.
    saved = distributed.broadcast_from_main(
        load_file(adapter_dir / WEIGHTS_FILE) if distributed.is_main_process() else None)
    with distributed.whole_adapter(model):
        copy_adapter_tensors(model, saved, adapter_dir)
