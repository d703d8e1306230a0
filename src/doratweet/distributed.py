"""Several processes, one training run: the process group, who is rank 0, and the collectives training needs.

torchrun and `accelerate launch` start one process per GPU (or per CPU slot) and tell each, in its environment,
RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. `process_group()` joins that group (nccl on CUDA,
gloo on CPU). A command started without a launcher never creates a process group, and every helper here then
returns at once without communicating: a plain `doratweet train` runs exactly as it always did.

Two engines, both PyTorch's own (docs/distributed.md):
- DistributedDataParallel (the default): every rank holds the whole model; adapter gradients are averaged.
- FSDP2 (`fully_shard`, with `--fsdp`): each decoder layer's weights, frozen and trainable alike, are split
  across ranks and gathered only while that layer runs, for base models that do not fit one GPU.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError
from .hardware import default_device, fp32_or_wider

# Rank 0 evaluates (before and after `run`'s training, and validation under DDP) while the other ranks wait in
# a collective; the default timeout (10 min for nccl) would end long evaluations.
_TIMEOUT = timedelta(hours=2)


def launched() -> bool:
    """True when torchrun or `accelerate launch` started this process (even as its only process)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main_process() -> bool:
    """Rank 0: the one process that reads and writes the run folder and shows progress."""
    return rank() == 0


def process_device() -> torch.device:
    """The device this process computes on: under a launcher, GPU number LOCAL_RANK of this machine."""
    if not launched() or not torch.cuda.is_available():
        return default_device()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK {local_rank}: this machine has {torch.cuda.device_count()} GPUs; start at most "
                        "that many processes per node (torchrun --nproc_per_node)")
    return torch.device("cuda", local_rank)


@contextmanager
def process_group():
    """Join the launcher's process group for the duration of a command (a `with` block, or a decorator on the
    command's function); without a launcher, do nothing."""
    if not launched() or active():
        yield
        return
    device = process_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=_TIMEOUT)
    if not is_main_process():  # N copies of every info line would bury the one that matters
        logging.getLogger("doratweet").setLevel(logging.WARNING)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()  # no barrier: the other ranks may be gone already
        raise
    # Leave together: a rank that tears gloo down while rank 0 still writes the run folder makes gloo abort the
    # process ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


@contextmanager
def main_process_first():
    """Rank 0 runs the block before the others do: for loads that fill a cache on first use (the dequantised
    embedded model, Hub downloads), where several processes writing the same cache at once could break it."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def sum_over_processes(value: torch.Tensor) -> float:
    """The sum of a scalar over all ranks, as a float every rank gets."""
    if not active():
        return value.item()
    total = fp32_or_wider(value.detach()).reshape(1).clone()
    dist.all_reduce(total)
    return total.item()


def any_process(flag: bool) -> bool:
    """True on every rank when it is True on any (e.g. one rank saw Ctrl-C first: all stop after the same step)."""
    if not active():
        return flag
    value = torch.tensor([int(flag)], device=process_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_from_main(value):
    """Rank 0's `value` on every rank (any picklable object: metrics, a checkpoint's tensors)."""
    if not active():
        return value
    box = [value if is_main_process() else None]
    dist.broadcast_object_list(box, src=0, device=process_device())
    return box[0]


def gather_from_all(value) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if not active():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


# --- DistributedDataParallel ---------------------------------------------------------------------------------

def data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` wrapped in DDP: its forward runs as is, and backward averages the gradients over the ranks.

    Only the adapter parameters have gradients, so only they are all-reduced. Every adapter parameter is used in
    every forward (the shared prefix only uses them twice), so find_unused_parameters stays off.
    """
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def gradient_sync(module: nn.Module | None, enabled: bool):
    """Around the forward and backward of a micro-batch: skip DDP's all-reduce on all but the last micro-batch
    of an accumulated step (the gradients add up locally first). FSDP reduces every micro-batch."""
    from torch.nn.parallel import DistributedDataParallel

    if enabled or not isinstance(module, DistributedDataParallel):
        return nullcontext()
    return module.no_sync()


# --- FSDP2 ---------------------------------------------------------------------------------------------------

def shard_decoder_layers(model: nn.Module, device: torch.device) -> None:
    """Shard `model` across the ranks in place with FSDP2: one unit per decoder layer, then the decoder itself.

    A layer's unit holds its frozen base weights and its adapters (lora_A, lora_B and DoRA's magnitude): each
    parameter is split along its first dimension, and FSDP gathers the whole layer just before it runs and
    frees it after, so DoRALinear always sees whole W, A, B and m. The layers are the classes transformers
    itself keeps whole when it splits a model (`_no_split_modules`). The input embeddings and the output head
    stay whole on every rank: they are frozen (nothing to reduce), and the head runs outside the decoder
    (`answer_loss` applies it only at answer positions) and is the embedding matrix itself in tied models.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    decoder = model.get_decoder()
    layers = [m for m in decoder.modules() if type(m).__name__ in layer_classes]
    assert layers, f"no decoder layers ({', '.join(layer_classes) or 'no _no_split_modules'}) in {type(model).__name__}"
    from .adapters import DoRALinear

    for layer in layers:
        fully_shard(layer, mesh=mesh)
    for module in model.modules():
        if isinstance(module, DoRALinear):  # its cached norm cannot see FSDP's re-gathered weights change
            module.cache_norm = False
    whole = set(model.get_input_embeddings().parameters()) | set(model.get_output_embeddings().parameters())
    fully_shard(decoder, mesh=mesh, ignored_params=whole)


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP-sharded one (a collective: every rank must call it); others as they are."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`whole` split the way `like` is; every rank holds the same `whole`, so each just keeps its own part."""
    if not is_sharded(like):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


@contextmanager
def whole_adapter(model: nn.Module):
    """Inside the block, every adapter module holds its whole lora_A, lora_B and magnitude (on every rank), so
    saving and loading the adapter work as in one process; on leaving, each rank keeps its part of what the
    block left there. Without FSDP this does nothing.

    FSDP2 registers a module's sharded parameters as its attributes between forward passes (and swaps in the
    gathered ones during them); this does the same swap, outside any forward pass, and swaps back.
    """
    from .adapters.inject import adapter_modules

    swapped = []  # (module, name, sharded parameter, whole parameter)
    for module in adapter_modules(model).values():
        for name, param in list(module.named_parameters(recurse=False)):
            if is_sharded(param):
                whole = nn.Parameter(param.detach().full_tensor(), requires_grad=False)
                module._parameters[name] = whole
                swapped.append((module, name, param, whole))
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, sharded, whole in swapped:
                sharded.copy_(shard_like(whole.detach(), sharded))
                module._parameters[name] = sharded


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_`, also for FSDP-sharded gradients: the norm is the whole gradient's, on every rank."""
    grads = [p.grad for p in params if p.grad is not None]
    if not any(is_sharded(g) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    total = full_tensor(torch.nn.utils.get_total_norm(grads))  # the ranks' partial norms, combined
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
