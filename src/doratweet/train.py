"""The training loop, in plain PyTorch: AdamW on adapter parameters, warm-up + cosine, accumulation,
clipping, length-bucketed batches, periodic validation keeping the best adapter, checkpoints and resume.

Under torchrun the same loop runs in every process (docs/distributed.md): each builds the same global batches
and takes its slice of each, gradients are averaged by DDP (or FSDP with `fsdp=True`), and rank 0 alone
validates and writes files. With the same --batch-size it follows the single-process trajectory.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed
from .adapters import DEFAULT_TARGETS, add_adapters, adapter_parameters, get_adapter_config, save_adapter
from .adapters.inject import adapter_state_dict, check_rank_fits, copy_adapter_tensors
from .checkpoints import (
    checkpoint_folders,
    load_latest_checkpoint,
    optimizer_from_files,
    optimizer_to_files,
    save_checkpoint,
)
from .data import Split
from .errors import UserError
from .hardware import fp32_or_wider, inference_model
from .evaluate import (
    classification_metrics,
    common_prefix,
    prefix_cache,
    probabilities_from_scores,
    score_labels,
    split_model,
)
from .prompts import IGNORE_INDEX, PromptFormat, training_example
from .stopping import StopRequests

CHECKPOINT_DIR = "checkpoint"
ADAPTER_DIR = "adapter"
LOG_FILE = "train_log.jsonl"


MAX_COUNT = 2**63 - 1  # the largest 64-bit integer: what torch takes as a number
# torch.manual_seed takes 0..2**64-1 (a negative seed repeats a positive one's state); under torchrun rank r seeds
# with seed + 1_000_003 * r, which stays in range from any seed up to 2**63 - 1.
MAX_SEED = 2**63 - 1
COUNT_FIELDS = ("rank", "batch_size", "grad_accum", "max_steps", "eval_every", "eval_limit", "save_every",
                "log_every", "eval_batch_size")


# Bounds far above any useful value, so that an absurd one (`--alpha 1e308`) is refused before anything is made
# instead of training into a NaN loss: alpha/r scales the update; weight decay stays at most 1 so that lr x decay, the
# share AdamW takes off each weight per step, stays below 1 (--lr is below 1).
MAX_ALPHA = 100_000
MAX_EPOCHS = 1_000_000


@dataclass
class TrainConfig:
    method: str = "dora"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS
    use_rslora: bool = False
    epochs: float = 1.0
    lr: float = 2e-4
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.0
    seed: int = 0
    eval_every: int = 0  # optimizer steps between validations; 0 = only at the end
    eval_limit: int | None = None  # validate on the first N validation tweets
    save_every: int = 0  # optimizer steps between checkpoints; 0 = none (Ctrl-C still saves one)
    log_every: int = 10
    eval_batch_size: int = 32
    bf16: bool | None = None  # autocast to bf16; None = on CUDA only (on CPU it gained < 10% here)
    fsdp: bool = False  # shard the model across the launched processes (FSDP2) instead of replicating it (DDP)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        """Options a user can get wrong are refused here, before any model is loaded."""
        self.targets = tuple(self.targets)
        checks = [
            ("method", self.method in ("dora", "lora"), "choose dora or lora"),
            ("rank", self.rank >= 1, "must be 1 or more"),
            ("alpha", 0 < self.alpha <= MAX_ALPHA, f"must be a positive number, at most {MAX_ALPHA}"),
            ("dropout", 0.0 <= self.dropout < 1.0, "must be in [0, 1)"),
            ("targets", len(self.targets) > 0, "name at least one module, e.g. q_proj,v_proj"),
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
        ]
        # Counts go into torch as 64-bit integers (a larger one raised OverflowError mid-run).
        checks += [(name, getattr(self, name) is None or getattr(self, name) <= MAX_COUNT,
                    f"must be at most {MAX_COUNT}") for name in COUNT_FIELDS]
        for name, ok, fix in checks:
            if not ok:
                value = getattr(self, name)
                shown = ",".join(value) if isinstance(value, tuple) else value
                raise UserError(f"--{name.replace('_', '-')} {shown}: {fix}")
        if self.fsdp and not distributed.launched():
            raise UserError("--fsdp: shards the model across several processes; start them with torchrun "
                            "--nproc_per_node N (see docs/distributed.md)")


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
                answer_tokens: int | None = None) -> torch.Tensor:
    """Cross-entropy on the answer tokens only; the vocabulary projection runs only at those positions,
    which skips most of the output head's cost (49k words x every prompt token for SmolLM2).

    `ids` hold what follows the shared `prefix` (computed once for the batch, see `prefix_cache`). The loss is
    the mean over the batch's answer tokens; with `answer_tokens` it is their sum divided by that count instead,
    so that the slices of one global batch on several ranks add up to exactly the whole batch's mean."""
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
    predicts = targets[:, 1:] != IGNORE_INDEX  # position t predicts token t+1
    logits = fp32_or_wider(head(hidden[:, :-1][predicts]))
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

    def forward(self, ids, targets, mask, prefix, label_smoothing, answer_tokens):
        return answer_loss(self.model, ids, targets, mask, prefix, label_smoothing, answer_tokens)


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


def train(
    model,
    fmt: PromptFormat,
    train_split: Split,
    val_split: Split | None,
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    base_model_id: str | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Fine-tune adapters on `train_split`; the best adapter (by validation macro-F1) ends in out_dir/adapter
    and in the model. Returns a summary of what was done.

    Inside a process group (see `distributed.process_group`) every rank calls this with the same arguments;
    rank 0 alone writes out_dir, and, with FSDP, the model stays sharded across the ranks afterwards."""
    out_dir = Path(out_dir)
    parallel, world, main = distributed.active(), distributed.world_size(), distributed.is_main_process()
    torch.manual_seed(config.seed)
    if get_adapter_config(model) is None:
        check_rank_fits(model, config.targets, config.rank)
        add_adapters(model, config.method, config.rank, config.alpha, config.dropout, config.targets, config.use_rslora)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    get_adapter_config(model).extra = {**get_adapter_config(model).extra, **config.extra}
    device = adapter_parameters(model)[0].device
    use_bf16 = config.bf16 if config.bf16 is not None else device.type == "cuda"
    if distributed.rank() > 0:  # the adapters start equal everywhere; dropout masks should not repeat across ranks
        torch.manual_seed(config.seed + 1_000_003 * distributed.rank())
    if config.fsdp:
        distributed.shard_decoder_layers(model, device)
    params = adapter_parameters(model)  # under FSDP: the ranks' shards
    loss_module = None  # several ranks: computes this rank's share of a batch's loss
    if parallel:  # DDP replicates the model and wraps the loss; an FSDP model syncs gradients itself
        loss_module = AnswerLoss(model) if config.fsdp else distributed.data_parallel(AnswerLoss(model), device)

    examples = encode_split(fmt, train_split)
    # FSDP gathers a layer's weights again for backward when the gradient reaches the layer's output; the shared
    # prefix pass hands its gradient on through the KV cache instead, so under FSDP each tweet runs whole.
    prefix = [] if config.fsdp else common_prefix(fmt, [ids for ids, _ in examples])
    examples = [(ids[len(prefix) :], targets[len(prefix) :]) for ids, targets in examples]
    lengths = [len(ids) for ids, _ in examples]
    answer_counts = [sum(t != IGNORE_INDEX for t in targets[1:]) for _, targets in examples]
    micro_per_epoch = math.ceil(len(examples) / config.batch_size)
    steps_per_epoch = max(1, micro_per_epoch // config.grad_accum)
    total_steps = config.max_steps or max(1, round(steps_per_epoch * config.epochs))
    warmup = max(1, round(config.warmup_ratio * total_steps))
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup))
    val_prompts = val_labels = None
    if val_split is not None and len(val_split):
        val_split = val_split.head(config.eval_limit)
        val_prompts, val_labels = fmt.prompt_ids(val_split.texts), val_split.labels

    state = TrainState()
    checkpoint = out_dir / CHECKPOINT_DIR
    log_path = out_dir / LOG_FILE
    if resume:
        state, log_bytes = _load_checkpoint(checkpoint, model, optimizer, scheduler, config)
        if main and log_path.is_file() and log_path.stat().st_size > log_bytes:
            os.truncate(log_path, log_bytes)  # drop lines logged after the checkpoint: they are redone
    log_file = log_path.open("a" if resume else "w") if main else None

    def micro_batches_from(step: int):
        """Micro-batches of every optimizer step from `step` on, across epochs."""
        micro = step * config.grad_accum
        epoch = micro // (steps_per_epoch * config.grad_accum)
        while True:
            batches = epoch_batches(lengths, config.batch_size, config.seed, epoch)[: steps_per_epoch * config.grad_accum]
            offset = micro - epoch * steps_per_epoch * config.grad_accum
            for batch in batches[offset:]:
                yield epoch, batch
            micro = (epoch + 1) * steps_per_epoch * config.grad_accum
            epoch += 1

    def micro_batch_loss(batch: list[int]) -> tuple[torch.Tensor, float]:
        """The loss to backpropagate for one (global) micro-batch, and the batch's mean answer-token loss."""
        if not parallel:
            ids, targets, mask = right_pad([examples[i] for i in batch], fmt.tokenizer.pad_token_id, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = answer_loss(model, ids, targets, mask, prefix, config.label_smoothing)
            return loss, loss.item()
        mine, weight = rank_slice(batch, distributed.rank(), world)
        ids, targets, mask = right_pad([examples[i] for i in mine], fmt.tokenizer.pad_token_id, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            share = weight * loss_module(ids, targets, mask, prefix, config.label_smoothing,
                                         sum(answer_counts[i] for i in batch))
        # The ranks' shares add up to the batch's mean loss; DDP and FSDP average gradients over the ranks, so
        # each share's gradient counts `world` times to make that average the gradient of the batch's mean.
        return share * world, distributed.sum_over_processes(share)

    def log_line(line: dict) -> None:
        if log_file is not None:
            log_file.write(json.dumps(line) + "\n")
            log_file.flush()

    def write_adapter() -> None:
        with distributed.whole_adapter(model):
            if main:
                save_adapter(model, out_dir / ADAPTER_DIR, base_model_id=base_model_id)

    def save():
        _save_checkpoint(checkpoint, model, optimizer, scheduler, state, config, log_file.tell() if main else 0)

    def evaluate_and_keep_best():
        if val_prompts is None:
            return
        metrics = None
        if main or config.fsdp:  # under DDP the others wait for rank 0's result; under FSDP all ranks score
            metrics = validate(model, fmt, val_prompts, val_labels, config.eval_batch_size, sharded=config.fsdp,
                               bf16=use_bf16)
        metrics = distributed.broadcast_from_main(metrics)
        log_line({"step": state.step, "val_macro_f1": metrics["macro_f1"], "val_macro_recall": metrics["macro_recall"],
                  "val_accuracy": metrics["accuracy"]})
        if metrics["macro_f1"] > state.best_val_macro_f1:
            state.best_val_macro_f1, state.best_step = metrics["macro_f1"], state.step
            write_adapter()

    def stop_if_not_finite(value: float, what: str):
        if math.isfinite(value):
            return
        kept = _last_checkpoint_note(checkpoint)
        hint = " (bf16 overflow?)" if use_bf16 else ""
        raise UserError(f"training stopped at step {state.step + 1}: the {what} became {value}{hint} and the adapter "
                        f"was not updated with it; {kept}; lower --lr and run again")

    model.train()
    source = micro_batches_from(state.step)
    bar = tqdm(total=total_steps, initial=state.step, desc="training", unit="step", disable=not (progress and main))
    started = time.perf_counter() - state.seconds
    window_tokens, window_start, window_loss = 0, time.perf_counter(), state.unlogged_losses
    updating = False  # True while the weights, optimizer and schedule are between two steps' states
    stopping_together = False  # every rank agreed to stop after this step (Ctrl-C on any of them)
    try:
        with StopRequests() as stop_requests:
            while state.step < total_steps:
                optimizer.zero_grad(set_to_none=True)
                step_losses = []
                for micro in range(config.grad_accum):
                    epoch, batch = next(source)
                    last = micro == config.grad_accum - 1
                    with distributed.gradient_sync(loss_module, enabled=last):
                        loss, loss_value = micro_batch_loss(batch)
                        step_losses.append(loss_value)
                        stop_if_not_finite(loss_value, "loss")
                        (loss / config.grad_accum).backward()
                    n_tokens = sum(lengths[i] for i in batch) + len(prefix) * len(batch)  # tokens trained on
                    window_tokens += n_tokens
                    state.tokens += n_tokens
                grad_norm = distributed.clip_grad_norm(params, config.max_grad_norm)
                stop_if_not_finite(float(grad_norm), "gradient norm")
                updating = True
                optimizer.step()
                scheduler.step()
                state.step += 1
                state.seconds = time.perf_counter() - started
                window_loss.extend(step_losses)
                updating = False
                bar.update(1)
                if state.step % config.log_every == 0 or state.step == total_steps:
                    rate = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                    line = {"step": state.step, "epoch": round(state.step / steps_per_epoch, 4),
                            "loss": float(np.mean(window_loss)), "lr": scheduler.get_last_lr()[0],
                            "tokens_per_s": round(rate, 1), "elapsed_s": round(state.seconds, 2)}
                    log_line(line)
                    bar.set_postfix(loss=f"{line['loss']:.4f}", lr=f"{line['lr']:.2e}", tok_s=f"{rate:.0f}")
                    window_tokens, window_start, window_loss = 0, time.perf_counter(), []
                    state.unlogged_losses = window_loss
                if config.eval_every and state.step % config.eval_every == 0 and state.step < total_steps:
                    evaluate_and_keep_best()
                if config.save_every and state.step % config.save_every == 0:
                    save()
                if on_step is not None:
                    on_step(state.step)
                if distributed.any_process(stop_requests.pressed):
                    stopping_together = True
                    stop_requests.stop()
        evaluate_and_keep_best()
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (stopping.Terminated)
        # Between steps the weights, optimizer and schedule agree: safe to resume from. Several ranks save only
        # when they stopped together (saving is collective); a second Ctrl-C there stops without saving.
        if not updating and (not parallel or stopping_together):
            save()
        # The CLI's last line says what is kept; rank 0 alone is sure to see the run folder.
        raise type(stop)(_last_checkpoint_note(checkpoint) if main else "") from stop
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    model.eval()
    if val_prompts is None:
        write_adapter()
    elif state.best_step != state.step:  # an earlier validation was better: bring those weights back
        _load_adapter_weights(model, out_dir / ADAPTER_DIR)
    return {
        **{k: v for k, v in asdict(config).items() if k != "extra"},
        "targets": list(config.targets),
        "steps": state.step,
        "train_examples": len(examples),
        "tokens": state.tokens,
        "seconds": round(state.seconds, 2),
        "device": device.type,
        "precision": "bf16 autocast" if use_bf16 else "fp32",
        "processes": world,
        "parallelism": ("fsdp" if config.fsdp else "ddp") if parallel else "none",
        "trainable_parameters": sum(p.numel() for p in params),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "best_step": state.best_step if val_prompts is not None else state.step,
        "best_val_macro_f1": state.best_val_macro_f1 if val_prompts is not None else None,
    }


def load_trained_adapter(model, config: TrainConfig, adapter_dir: Path) -> None:
    """Put an adapter this run trained earlier (saved in `adapter_dir`) into the model, adding the adapter layers
    first if the model has none, so that training can go on from it."""
    if get_adapter_config(model) is None:
        add_adapters(model, config.method, config.rank, config.alpha, config.dropout, config.targets, config.use_rslora)
    _load_adapter_weights(model, adapter_dir)


def _load_adapter_weights(model, adapter_dir: Path) -> None:
    from safetensors.torch import load_file

    # Rank 0 reads (only its disk is sure to hold the run folder) and hands the tensors to the others.
    saved = distributed.broadcast_from_main(
        load_file(adapter_dir / "adapter_model.safetensors") if distributed.is_main_process() else None)
    with distributed.whole_adapter(model):
        copy_adapter_tensors(model, saved, adapter_dir)


def _resume_relevant(config: TrainConfig) -> dict:
    """The options a resumed run must share with the checkpoint."""
    # How often it logs or saves may change; so may --fsdp (checkpoints hold whole tensors either way).
    values = {k: v for k, v in asdict(config).items() if k not in ("eval_every", "save_every", "log_every", "fsdp")}
    return _comparable(json.loads(json.dumps(values)))  # as JSON sees it: tuples become lists


def _comparable(options: dict) -> dict:
    """Options as a resume compares them. Neither the order of the targets nor where an adapter trained further
    came from changes what the checkpoint continues (it holds the adapter's weights)."""
    options = dict(options)
    if "targets" in options:
        options["targets"] = sorted(options["targets"])
    if "extra" in options:
        options["extra"] = {k: v for k, v in (options["extra"] or {}).items() if k != "init_adapter"}
    return options


def _save_checkpoint(folder: Path, model, optimizer, scheduler, state: TrainState, config: TrainConfig,
                     log_bytes: int) -> None:
    """Everything needed to continue exactly: adapter weights, optimizer, schedule, RNG, progress, log length.

    Several ranks: every rank calls this (FSDP's shards are gathered whole, each rank's RNG state is collected)
    and rank 0 writes one checkpoint. Adapter and optimizer are the same on every rank under DDP."""
    with distributed.whole_adapter(model):
        adapter = {f"adapter.{k}": v for k, v in adapter_state_dict(model).items()}
    optimizer_tensors, optimizer_plain = optimizer_to_files(optimizer)
    optimizer_tensors = {k: distributed.full_tensor(v) for k, v in optimizer_tensors.items()}
    rng = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["rng.cuda"] = torch.cuda.get_rng_state()
    if distributed.active():  # every rank draws its own dropout masks
        every_rank = distributed.gather_from_all(rng)
        rng = {f"{k}.rank{r}": v for r, states in enumerate(every_rank) for k, v in states.items()}
    if distributed.is_main_process():
        save_checkpoint(folder, state.step, {**adapter, **optimizer_tensors, **rng}, {
            "progress": asdict(state), "config": _resume_relevant(config), "optimizer": optimizer_plain,
            "scheduler": scheduler.state_dict(), "log_bytes": log_bytes, "world_size": distributed.world_size()})
    distributed.barrier()  # no rank leaves (e.g. exits after Ctrl-C, ending the job) before the checkpoint exists


def _load_checkpoint(folder: Path, model, optimizer, scheduler, config: TrainConfig) -> tuple[TrainState, int]:
    # Rank 0 reads (only its disk is sure to hold the run folder) and hands the checkpoint to the others.
    tensors, saved = distributed.broadcast_from_main(
        load_latest_checkpoint(folder) if distributed.is_main_process() else None)
    written_by, world = saved.get("world_size", 1), distributed.world_size()
    if written_by != world:  # each rank's RNG state is in the checkpoint, and exactness needs the same ranks
        raise UserError(f"--resume: the checkpoint in {folder} was written by {written_by} process(es) and this run "
                        f"has {world}; resume with {written_by} (e.g. torchrun --nproc_per_node {written_by})")
    current = _resume_relevant(config)
    written = _comparable(saved["config"])
    changed = [k for k in current if k in written and written[k] != current[k]]
    if changed:
        raise UserError(f"--resume: options differ from the checkpoint's ({', '.join(changed)}); use the same options")
    with distributed.whole_adapter(model):
        adapter = {k.removeprefix("adapter."): v for k, v in tensors.items() if k.startswith("adapter.")}
        copy_adapter_tensors(model, adapter, folder)
    optimizer_state = optimizer_from_files(tensors, saved["optimizer"])
    params = optimizer.param_groups[0]["params"]
    for index, per_param in optimizer_state["state"].items():  # whole moments -> this rank's shards (FSDP)
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor) and value.shape == params[index].shape:
                per_param[name] = distributed.shard_like(value, params[index])
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(saved["scheduler"])
    rng = tensors
    if distributed.active():  # this rank's own RNG states
        suffix = f".rank{distributed.rank()}"
        rng = {k.removesuffix(suffix): v for k, v in tensors.items() if k.endswith(suffix)}
    torch.set_rng_state(rng["rng.torch"])
    if "rng.cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["rng.cuda"])
    return TrainState(**saved["progress"]), saved["log_bytes"]


def _last_checkpoint_note(folder: Path) -> str:
    found = checkpoint_folders(folder)
    if not found:
        return "no checkpoint had been saved (see --save-every)"
    return f"the last good checkpoint, {found[0]}, is kept (continue from it with --resume)"
