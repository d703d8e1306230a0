"""Training adapters on the top layers only (`--layers`) without running the frozen layers below them every step.

The layers below the first adapted one have no adapter and never change, so their output for a tweet is the same at
every step, epoch and run. It is computed once per tweet (the hidden states entering the first adapted layer, and
those of the shared prompt prefix), kept on disk memory-mapped, and training runs only the layers above it:

    embeddings, layers 0 .. first-1   once per tweet, no gradient   -> cached hidden states
    layers first .. L-1, norm, head   every step, forward and backward

The cache is keyed by what decides its content: the frozen weights, the first adapted layer, the token ids of
every tweet and of the prefix (so the prompt, the tokenizer and the data), and the dtype. A cache whose checksum
does not match is rebuilt, with a message, never trusted.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import get_adapter_config
from .adapters.inject import adapted_layer_indices, decoder_layers
from .evaluate import batch_copy, batches_by_length, prefix_cache
from .files import sha256_of

log = logging.getLogger("doratweet")

_FORMAT = 1
_MANIFEST = "manifest.json"
_HIDDEN = "hidden.bin"  # [tokens, hidden size], the tweets one after another, float32 (float64 for fp64 models)
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
    loaded = _load(place, key, int(offsets[-1]), decoder.config.hidden_size, stored)
    if loaded is None:
        _build(bottom, prefix, sequences, pad_id, offsets, place, key, stored, progress)
        loaded = _load(place, key, int(offsets[-1]), decoder.config.hidden_size, stored)
    prefix_hidden, hidden = loaded
    return FrozenLayers(first, top, prefix_hidden.to(next(decoder.parameters()).device), offsets, hidden)


def cache_key(bottom: nn.Module, first: int, prefix: list[int], sequences: list[list[int]], dtype) -> str:
    """SHA-256 of everything the cached hidden states depend on."""
    settings = {"format": _FORMAT, "first": first, "dtype": str(dtype), "config": bottom.config.to_dict()}
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


def _load(place: Path, key: str, tokens: int, width: int, stored):
    manifest_file = place / _MANIFEST
    if not manifest_file.is_file():
        return None
    try:
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("key") != key or manifest.get("shape") != [tokens, width]:
            raise ValueError("it was made for other weights, tweets or prompt")
        if sha256_of(place / _HIDDEN) != manifest["sha256"]:
            raise ValueError(f"{_HIDDEN} does not match its checksum")
        prefix = torch.tensor(manifest["prefix"], dtype=torch.float64)
    except (OSError, ValueError, KeyError) as why:
        log.warning("the frozen-layer cache in %s is damaged or stale (%s); computing it again", place, why)
        return None
    hidden = np.memmap(place / _HIDDEN, dtype=stored, mode="r", shape=(tokens, width))
    return prefix.reshape(-1, width), hidden


@torch.no_grad()
def _build(bottom: nn.Module, prefix: list[int], sequences: list[list[int]], pad_id: int, offsets: np.ndarray,
           place: Path, key: str, stored, progress: bool) -> None:
    device = next(bottom.parameters()).device
    width = bottom.config.hidden_size
    place.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=place.parent, prefix=f".{place.name}."))
    try:
        hidden = np.memmap(tmp / _HIDDEN, dtype=stored, mode="w+", shape=(int(offsets[-1]), width))
        prefix_ids = torch.tensor([prefix], device=device)
        prefix_hidden = bottom(input_ids=prefix_ids).last_hidden_state[0] if prefix else torch.zeros(0, width)
        shared = prefix_cache(bottom, prefix, 1, device)
        batches = batches_by_length(sequences, _BUILD_BATCH)
        for batch in tqdm(batches, desc="caching frozen layers", unit="batch", disable=not progress):
            longest = max(len(sequences[i]) for i in batch)
            ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
                mask[row, : len(sequences[i])] = 1
            n = len(prefix)
            full_mask = torch.cat([torch.ones(len(batch), n, dtype=mask.dtype), mask], dim=1).to(device)
            positions = (n + torch.arange(longest)).expand(len(batch), -1).to(device)
            out = bottom(input_ids=ids.to(device), attention_mask=full_mask, position_ids=positions,
                         past_key_values=batch_copy(shared, len(batch)), use_cache=shared is not None).last_hidden_state
            out = out.cpu().numpy().astype(stored)
            for row, i in enumerate(batch):
                hidden[offsets[i] : offsets[i + 1]] = out[row, : len(sequences[i])]
        hidden.flush()
        del hidden
        manifest = {"format": _FORMAT, "key": key, "shape": [int(offsets[-1]), width], "dtype": np.dtype(stored).name,
                    "prefix": prefix_hidden.double().cpu().flatten().tolist(), "sha256": sha256_of(tmp / _HIDDEN)}
        (tmp / _MANIFEST).write_text(json.dumps(manifest))
        if place.exists():
            shutil.rmtree(place)
        os.replace(tmp, place)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

