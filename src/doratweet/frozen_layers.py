"""Training adapters on the top layers only (`--layers`) without running the frozen layers below them every step.

The layers below the first adapted one have no adapter and never change, so their output for a tweet is the same at
every step, epoch and run. It is computed once per tweet (the hidden states entering the first adapted layer, and
those of the shared prompt prefix), kept on disk memory-mapped, and training runs only the layers above it:

    embeddings, layers 0 .. first-1   once per tweet, no gradient   -> cached hidden states
    layers first .. L-1, norm, head   every step, forward and backward

The cache is keyed by what decides its content: the frozen weights, the first adapted layer, the token ids of
every tweet and of the prefix (so the prompt, the tokenizer and the data), and the dtype; not by where the model was
read from, so the same weights under another path share it. A cache whose manifest or checksum does not match is
rebuilt, with a message, never trusted. A cache folder that cannot be used (no space, no permission, not a folder)
is a one-line error naming it.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import get_adapter_config
from .adapters.inject import adapted_layer_indices, decoder_layers
from .evaluate import batch_copy, batches_by_length, prefix_cache
from .errors import UserError
from .files import sha256_of

log = logging.getLogger("doratweet")

_FORMAT = 2
_MANIFEST = "manifest.json"
# [prefix tokens + tweet tokens, hidden size]: the shared prefix's rows, then the tweets' one after another, float32
# (float64 for fp64 models). The prefix is in the same file so that the checksum covers it too.
_HIDDEN = "hidden.bin"
_BUILD_BATCH = 32


def first_adapted_layer(model: nn.Module) -> int:
    """The index of the lowest decoder layer holding an adapter (0 when the bottom layer has one)."""
    return min(adapted_layer_indices(model, get_adapter_config(model).layers))


def decoder_view(decoder: nn.Module, layers, final_norm: bool) -> nn.Module:
    """The decoder running only `layers` (a slice of its own); without `final_norm` it returns their output as it
    enters the next layer. A shallow copy: the layers, embeddings and rotary tables are the decoder's own."""
    view = copy.copy(decoder)
    view._modules = dict(decoder._modules)
    view._modules["layers"] = nn.ModuleList(layers)
    if not final_norm:
        view._modules["norm"] = nn.Identity()
    return view


@dataclass
class FrozenLayers:
    """The cached output of the frozen bottom, and the decoder above it."""

    first: int  # the first adapted layer: the cache holds the hidden states entering it
    top: nn.Module  # the decoder from `first` up, fed hidden states instead of token ids
    prefix: torch.Tensor  # [prefix tokens, hidden] entering `first`, for the shared prompt prefix
    offsets: np.ndarray  # tweet i's hidden states are rows offsets[i]:offsets[i + 1] of `hidden`
    hidden: np.ndarray  # memory-mapped [tokens, hidden]

    def batch(self, indices: list[int], device, dtype) -> torch.Tensor:
        """The tweets' hidden states, right-padded with zeros (padding is masked out) to [B, W, hidden]."""
        lengths = [self.offsets[i + 1] - self.offsets[i] for i in indices]
        out = np.zeros((len(indices), max(lengths), self.hidden.shape[1]), dtype=self.hidden.dtype)
        for row, i in enumerate(indices):
            out[row, : lengths[row]] = self.hidden[self.offsets[i] : self.offsets[i + 1]]
        return torch.from_numpy(out).to(device=device, dtype=dtype)

    def top_prefix_cache(self, batch: int, dtype):
        """Keys/values of the prefix in the top layers (with gradients: they have adapters), repeated for a batch.
        The frozen layers' slots get zeros of the prefix's length, which no layer reads: they only tell the mask
        and the positions how long the prefix is."""
        from transformers import DynamicCache

        if len(self.prefix) == 0:
            return None
        cache = DynamicCache(config=self.top.config)
        self.top(inputs_embeds=self.prefix[None].to(dtype), use_cache=True, past_key_values=cache)
        keys = cache.layers[self.first].keys
        for index in range(self.first):
            cache.update(torch.zeros_like(keys), torch.zeros_like(keys), index)
        cache.batch_repeat_interleave(batch)
        return cache


def frozen_layers(model: nn.Module, prefix: list[int], sequences: list[list[int]], pad_id: int, folder: Path,
                  progress: bool = True) -> FrozenLayers | None:
    """The frozen bottom's output for `prefix` and each of `sequences` (token ids after the prefix), from the cache
    under `folder` when it holds exactly this, else computed now and stored there. None when no layer is frozen
    below the adapters."""
    first = first_adapted_layer(model)
    if first == 0:
        return None
    decoder = model.get_decoder()
    layers = decoder_layers(model)
    bottom = decoder_view(decoder, layers[:first], final_norm=False)
    top = decoder_view(decoder, layers[first:], final_norm=True)
    dtype = next(decoder.parameters()).dtype
    key = cache_key(bottom, first, prefix, sequences, dtype)
    place = folder / key[:32]
    offsets = np.cumsum([0] + [len(s) for s in sequences])
    stored = np.float64 if dtype == torch.float64 else np.float32  # fp64: the tests' exact comparisons
    shape = (len(prefix) + int(offsets[-1]), decoder.config.hidden_size)
    try:
        hidden = _load(place, key, shape, len(prefix), stored)
        if hidden is None:
            _build(bottom, prefix, sequences, pad_id, offsets, place, key, stored, progress)
            hidden = _load(place, key, shape, len(prefix), stored)
    except OSError as why:
        where = why.filename or place
        raise UserError(f"the frozen-layer cache {where}: {why.strerror or why}; free space or fix its permissions, "
                        "set DORATWEET_CACHE to another folder, or train with --no-cache-frozen") from why
    if hidden is None:
        raise UserError(f"the frozen-layer cache {place} was changed while it was being read; run again")
    prefix_hidden = torch.from_numpy(np.array(hidden[: len(prefix)])).to(next(decoder.parameters()).device)
    return FrozenLayers(first, top, prefix_hidden, offsets, hidden[len(prefix) :])


def cache_key(bottom: nn.Module, first: int, prefix: list[int], sequences: list[list[int]], dtype) -> str:
    """SHA-256 of everything the cached hidden states depend on."""
    config = {k: v for k, v in bottom.config.to_dict().items() if k != "_name_or_path"}  # where, not what
    settings = {"format": _FORMAT, "first": first, "dtype": str(dtype), "config": config}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(bottom.state_dict().items()):
        if "rotary" in name:
            continue  # the rotary tables follow from the config, hashed above
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(np.asarray(prefix, dtype=np.int64).tobytes())
    for ids in sequences:
        digest.update(np.asarray([len(ids), *ids], dtype=np.int64).tobytes())
    return digest.hexdigest()


def _load(place: Path, key: str, shape: tuple[int, int], prefix_rows: int, stored) -> np.ndarray | None:
    """The cached [prefix + tweet tokens, hidden] array, memory-mapped, or None when there is none or it is damaged
    or stale (with a message). A folder that cannot be read raises OSError."""
    manifest_file = place / _MANIFEST
    if not manifest_file.exists():
        return None
    try:
        manifest = json.loads(manifest_file.read_text())
        if not isinstance(manifest, dict):
            raise ValueError(f"{_MANIFEST} is not a JSON object")
        if manifest.get("format") != _FORMAT or manifest.get("key") != key:
            raise ValueError("it was made for other weights, tweets, prompt or by another version")
        if manifest.get("shape") != list(shape) or manifest.get("prefix_rows") != prefix_rows:
            raise ValueError(f"its shape {manifest.get('shape')} is not {list(shape)}")
        if sha256_of(place / _HIDDEN) != manifest.get("sha256"):
            raise ValueError(f"{_HIDDEN} does not match its checksum")
    except (ValueError, IsADirectoryError, FileNotFoundError) as why:  # JSON and Unicode errors are ValueErrors
        log.warning("the frozen-layer cache in %s is damaged or stale (%s); computing it again", place, why)
        return None
    return np.memmap(place / _HIDDEN, dtype=stored, mode="r", shape=shape)


@torch.no_grad()
def _build(bottom: nn.Module, prefix: list[int], sequences: list[list[int]], pad_id: int, offsets: np.ndarray,
           place: Path, key: str, stored, progress: bool) -> None:
    device = next(bottom.parameters()).device
    width = bottom.config.hidden_size
    rows = len(prefix) + int(offsets[-1])
    place.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(place)
    tmp = place.parent / f".{place.name}.{_builder()}.{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _reserve(tmp / _HIDDEN, rows * width * np.dtype(stored).itemsize, place.parent)
        hidden = np.memmap(tmp / _HIDDEN, dtype=stored, mode="r+", shape=(rows, width))
        n = len(prefix)
        if prefix:
            hidden[:n] = bottom(input_ids=torch.tensor([prefix], device=device)).last_hidden_state[0].cpu().numpy()
        shared = prefix_cache(bottom, prefix, 1, device)
        batches = batches_by_length(sequences, _BUILD_BATCH)
        for batch in tqdm(batches, desc="caching frozen layers", unit="batch", disable=not progress):
            longest = max(len(sequences[i]) for i in batch)
            ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
                mask[row, : len(sequences[i])] = 1
            full_mask = torch.cat([torch.ones(len(batch), n, dtype=mask.dtype), mask], dim=1).to(device)
            positions = (n + torch.arange(longest)).expand(len(batch), -1).to(device)
            out = bottom(input_ids=ids.to(device), attention_mask=full_mask, position_ids=positions,
                         past_key_values=batch_copy(shared, len(batch)), use_cache=shared is not None).last_hidden_state
            out = out.cpu().numpy().astype(stored)
            for row, i in enumerate(batch):
                hidden[n + offsets[i] : n + offsets[i + 1]] = out[row, : len(sequences[i])]
        hidden.flush()
        del hidden
        manifest = {"format": _FORMAT, "key": key, "shape": [rows, width], "prefix_rows": n,
                    "dtype": np.dtype(stored).name, "sha256": sha256_of(tmp / _HIDDEN)}
        (tmp / _MANIFEST).write_text(json.dumps(manifest))
        tmp.chmod(0o755)  # readable by the other users of a shared cache folder, like the rest of the cache
        if place.is_dir() and not place.is_symlink():
            shutil.rmtree(place)
        elif place.exists() or place.is_symlink():
            place.unlink()
        os.replace(tmp, place)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _reserve(file: Path, size: int, folder: Path) -> None:
    """Allocate the cache file's blocks before writing it through a memory map: a disk that fills up under a memory
    map kills the process (SIGBUS) without a word, while a failed allocation is an error that can be reported."""
    free = shutil.disk_usage(folder).free
    if size > free:
        raise UserError(f"the frozen-layer cache needs {size / 2**30:.2f} GiB in {folder}, which has "
                        f"{free / 2**30:.2f} GiB free; free space, set DORATWEET_CACHE to another folder, "
                        "or train with --no-cache-frozen")
    with open(file, "wb") as f:
        if size:
            try:
                os.posix_fallocate(f.fileno(), 0, size)
            except OSError as why:
                if why.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # no fallocate: fall back to a sparse file
                    raise
                f.truncate(size)


def _builder() -> str:
    """Who builds a cache entry: the host and process, in the temporary folder's name."""
    return f"{socket.gethostname().replace('.', '-')}-{os.getpid()}"


def _remove_abandoned_builds(place: Path) -> None:
    """Temporary folders of builds of this entry whose process, on this host, is gone (killed with SIGKILL, or by
    the machine going down); builds in progress, and those of other hosts sharing the folder, are left alone."""
    host = socket.gethostname().replace(".", "-")
    for leftover in place.parent.glob(f".{place.name}.{host}-*"):
        pid = leftover.name.split(".")[2].rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            log.info("removing %s, left by a cache build that was killed", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
