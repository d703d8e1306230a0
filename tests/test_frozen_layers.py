"""--layers and the cache of the frozen layers below the adapters: training on the cached output is training on the
whole model, the cache is reused when it holds exactly what is asked, and rebuilt when it does not."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import TWEETS, build_tiny_model, models_in_float64, norms_in_the_models_dtype
from safetensors.torch import load_file

import doratweet.frozen_layers as frozen_module
from doratweet.adapters import AdapterConfig, add_adapters
from doratweet.config import TrainConfig
from doratweet.data import Split
from doratweet.prompts import make_prompt_format
from doratweet.train import TrainingData, train

TRAIN = Split("train", [t for t, _ in TWEETS], [y for _, y in TWEETS], "test")


@pytest.fixture(autouse=True)
def own_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DORATWEET_CACHE", str(tmp_path / "cache"))


def train_top_layer(tmp_path, name, cache_frozen: bool):
    """Three AdamW steps of a DoRA adapter on the top layer of the float64 tiny model; the loss log and weights."""
    model, tokenizer = build_tiny_model(dtype=torch.float64)
    config = TrainConfig(AdapterConfig(rank=4, alpha=8, dropout=0.0, layers="top:1"), batch_size=4, lr=1e-2,
                         max_steps=3, log_every=1, cache_frozen=cache_frozen)
    with norms_in_the_models_dtype():
        train(model, make_prompt_format(tokenizer), TRAIN, None, config, tmp_path / name, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
    return losses, load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")


def test_training_on_the_cached_bottom_is_training_on_the_whole_model(tmp_path):
    """float64 throughout, so the two paths differ only by summation order (~1e-16 a value); AdamW divides each step
    by |g| + eps and can lift a gradient change d to lr * d / eps a step, 1e-2 * 1e-15 / 1e-8 = 1e-9, so weights
    are compared to 1e-7 and losses to 1e-9 relative, far below what a wrong cache would move (a whole layer)."""
    cached_losses, cached = train_top_layer(tmp_path, "cached", cache_frozen=True)
    losses, whole = train_top_layer(tmp_path, "whole", cache_frozen=False)
    assert list(tmp_path.joinpath("cache", "frozen-layers").iterdir()), "the cached run must have used the cache"
    assert cached_losses == pytest.approx(losses, rel=1e-9)
    assert cached.keys() == whole.keys() and all(".layers.1." in key for key in cached)
    assert max((cached[k] - whole[k]).abs().max().item() for k in cached) < 1e-7


def test_the_loss_and_gradients_of_one_batch_match_without_the_cache(tmp_path):
    from doratweet.evaluate import common_prefix
    from doratweet.train import answer_loss, frozen_answer_loss, right_pad

    model, tokenizer = build_tiny_model(dtype=torch.float64)
    fmt = make_prompt_format(tokenizer)
    add_adapters(model, AdapterConfig(rank=4, alpha=8, layers="top:1"))
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    data = TrainingData.of(fmt, TRAIN, share_prefix=True)
    assert data.prefix == common_prefix(fmt, [fmt.prompt_ids([t])[0] for t in TRAIN.texts])
    batch = [0, 3, 5, 7]
    ids, targets, mask = right_pad([data.examples[i] for i in batch], tokenizer.pad_token_id, "cpu")
    results = []
    with norms_in_the_models_dtype():
        frozen = frozen_module.frozen_layers(model, data.prefix, [ids for ids, _ in data.examples],
                                             tokenizer.pad_token_id, tmp_path / "c", progress=False)
        for loss_of in (lambda: answer_loss(model, ids, targets, mask, data.prefix),
                        lambda: frozen_answer_loss(model, frozen, batch, targets, mask)):
            model.zero_grad()
            loss = loss_of()
            loss.backward()
            results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (whole_loss, whole_grads), (cached_loss, cached_grads) = results
    assert cached_loss == pytest.approx(whole_loss, rel=1e-12)
    assert max((a - b).abs().max().item() for a, b in zip(whole_grads, cached_grads)) < 1e-12


def test_the_cache_is_reused_and_a_damaged_or_stale_one_rebuilt(tmp_path, monkeypatch, caplog):
    model, tokenizer = build_tiny_model()
    add_adapters(model, AdapterConfig(rank=4, alpha=8, layers="top:1"))
    builds = []
    real_build = frozen_module._build
    monkeypatch.setattr(frozen_module, "_build", lambda *a, **k: (builds.append(1), real_build(*a, **k)))
    sequences = [[5, 6, 7], [8, 9]]

    def cache(seqs=sequences, prefix=(1, 2)):
        return frozen_module.frozen_layers(model, list(prefix), seqs, 0, tmp_path, progress=False)

    first = cache()
    assert len(builds) == 1 and first.hidden.shape == (5, model.config.hidden_size)
    again = cache()
    assert len(builds) == 1 and (again.hidden == first.hidden).all()
    (folder,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    with open(folder / "hidden.bin", "r+b") as f:
        f.write(b"\x00\x01\x02")
    cache()
    assert len(builds) == 2 and "damaged or stale" in caplog.text
    cache(seqs=[[5, 6, 7], [8, 10]])  # other tweets: another cache, never the first one's
    cache(prefix=(1, 3))  # another prompt
    assert len(builds) == 4 and len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 3


def test_a_model_adapted_from_its_bottom_layer_has_nothing_to_cache(tmp_path):
    model, _ = build_tiny_model()
    add_adapters(model, AdapterConfig(rank=4, alpha=8, layers="0"))
    assert frozen_module.frozen_layers(model, [1], [[2, 3]], 0, tmp_path, progress=False) is None


def test_train_with_layers_writes_an_adapter_peft_reads_on_those_layers(tiny_model_dir, tiny_data_dir, tmp_path):
    from doratweet.cli import main

    out = tmp_path / "top"
    assert main(["--quiet", "train", "--model", str(tiny_model_dir), "--data", str(tiny_data_dir), "--out", str(out),
                 "--rank", "4", "--alpha", "8", "--batch-size", "4", "--max-steps", "2", "--eval-limit", "4",
                 "--layers", "top:1"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["layers"] == "top:1" and summary["cache_frozen"] is True
    assert all(".layers.1." in key for key in load_file(out / "adapter" / "adapter_model.safetensors"))


def test_float64_models_keep_a_float64_cache(tmp_path):
    with models_in_float64():
        model, _ = build_tiny_model(dtype=torch.float64)
    add_adapters(model, AdapterConfig(rank=4, alpha=8, layers="top:1"))
    frozen = frozen_module.frozen_layers(model, [1, 2], [[3, 4]], 0, tmp_path, progress=False)
    assert frozen.hidden.dtype == "float64"


def cache_of_the_tiny_model(tmp_path, prefix=(1, 2)):
    model, _ = build_tiny_model()
    add_adapters(model, AdapterConfig(rank=4, alpha=8, layers="top:1"))
    return model, lambda: frozen_module.frozen_layers(model, list(prefix), [[5, 6, 7], [8, 9]], 0, tmp_path,
                                                      progress=False)


@pytest.mark.parametrize("damage", [
    lambda m: [],  # not an object
    lambda m: None,
    lambda m: {**m, "prefix_rows": "2"},
    lambda m: {**m, "shape": [m["shape"][0] - 1, m["shape"][1]]},
    lambda m: {k: v for k, v in m.items() if k != "sha256"},
])
def test_a_damaged_manifest_is_rebuilt_with_a_message(tmp_path, caplog, damage):
    _, cache = cache_of_the_tiny_model(tmp_path)
    first = cache()
    (folder,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(damage(manifest)))
    again = cache()
    assert "damaged or stale" in caplog.text
    assert (again.hidden == first.hidden).all() and torch.equal(again.prefix, first.prefix)
    assert json.loads((folder / "manifest.json").read_text()) == manifest


def test_the_prefix_is_covered_by_the_checksum(tmp_path, caplog):
    """The prefix's hidden states are the first rows of hidden.bin: changing them is caught like any damage."""
    _, cache = cache_of_the_tiny_model(tmp_path)
    first = cache()
    (folder,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    with open(folder / "hidden.bin", "r+b") as f:
        f.write(b"\x7f\x7f\x7f\x7f")  # the prefix's first value
    again = cache()
    assert "does not match its checksum" in caplog.text and torch.equal(again.prefix, first.prefix)


def test_a_disk_too_small_for_the_cache_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    from collections import namedtuple

    from doratweet.errors import UserError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(frozen_module.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 100, 100))
    _, cache = cache_of_the_tiny_model(tmp_path)
    with pytest.raises(UserError, match=r"needs 0\.00 GiB in .*, which has 0\.00 GiB free; .*--no-cache-frozen"):
        cache()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("obstacle", ["file", "dangling link"])
def test_a_cache_folder_that_cannot_be_made_is_one_line_naming_it(tmp_path, obstacle):
    from doratweet.errors import UserError

    model, _ = build_tiny_model()
    add_adapters(model, AdapterConfig(rank=4, alpha=8, layers="top:1"))
    folder = tmp_path / "frozen-layers"
    if obstacle == "file":
        folder.write_text("not a folder")
    else:
        folder.symlink_to(tmp_path / "gone")
    with pytest.raises(UserError, match=r"the frozen-layer cache .*frozen-layers.*DORATWEET_CACHE.*--no-cache-frozen"):
        frozen_module.frozen_layers(model, [1], [[2, 3]], 0, folder, progress=False)


def test_a_build_that_was_killed_leaves_nothing_once_the_next_build_runs(tmp_path):
    """A SIGKILLed build cannot clean up: its folder names the host and process, and the next build of the same
    entry removes it once that process is gone; a live build's folder is left alone."""
    import socket
    import subprocess

    _, cache = cache_of_the_tiny_model(tmp_path)
    cache()
    (folder,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    host = socket.gethostname().replace(".", "-")
    dead = subprocess.Popen(["true"])
    dead.wait()
    killed = tmp_path / f".{folder.name}.{host}-{dead.pid}.0123abcd"
    live = tmp_path / f".{folder.name}.{host}-{os.getpid()}.4567cdef"
    for leftover in (killed, live):
        leftover.mkdir()
        (leftover / "hidden.bin").write_bytes(b"half")
    (folder / "manifest.json").unlink()  # the entry must be built again
    cache()
    assert not killed.exists() and live.exists()


def test_the_same_weights_read_from_another_path_share_the_cache(tmp_path, tiny_model_dir):
    import shutil

    from doratweet.models import load_base_model

    copy = tmp_path / "same-weights"
    shutil.copytree(tiny_model_dir, copy)
    keys = []
    for folder in (tiny_model_dir, copy):
        model = load_base_model(str(folder)).model
        add_adapters(model, AdapterConfig(rank=4, alpha=8, layers="top:1"))
        bottom = frozen_module.decoder_view(model.get_decoder(), frozen_module.decoder_layers(model)[:1], False)
        keys.append(frozen_module.cache_key(bottom, 1, [1], [[2, 3]], torch.float32))
    assert keys[0] == keys[1]
