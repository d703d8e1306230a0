"""Tiny offline models and data the tests build themselves: nothing here touches the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TWEETS = [
    ("I love this phone, best purchase ever", 2),
    ("worst service I have ever had, never again", 0),
    ("The meeting is at 5pm tomorrow", 1),
    ("so happy with the new update :)", 2),
    ("this traffic is terrible and I am late", 0),
    ("Apple announces the event date for September", 1),
    ("what a great game last night!", 2),
    ("I hate waiting in line for hours", 0),
    ("The store opens at nine on Sundays", 1),
    ("amazing concert, thank you all", 2),
    ("my flight got cancelled again, awful", 0),
    ("New episode airs on Friday", 1),
]


def build_tokenizer():
    """A small byte-level BPE with ChatML special tokens, trained on the tweets above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [t for t, _ in TWEETS] + ["negative neutral positive system user assistant"] * 5
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHATML,
    )


def tiny_config(arch: str, vocab_size: int):
    from transformers import LlamaConfig, MistralConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,  # wide enough that the tied output head can express confident answers
    )
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    return MistralConfig(**common, tie_word_embeddings=False, sliding_window=None)


def build_tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random model; float64 for the tests that compare two computations of the same numbers (the
    rounding of other summation orders is then ~1e-16, whatever the CPU)."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer))).to(dtype)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random LLaMA with a ChatML tokenizer, loadable by `--model PATH`."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer = build_tiny_model("llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """TweetEval's official layout with a handful of tweets per split."""
    folder = tmp_path_factory.mktemp("tiny-tweeteval")
    (folder / "mapping.txt").write_text("0\tnegative\n1\tneutral\n2\tpositive\n")
    for split, rows in (("train", TWEETS), ("val", TWEETS[:6]), ("test", TWEETS[6:])):
        (folder / f"{split}_text.txt").write_text("".join(t + "\n" for t, _ in rows))
        (folder / f"{split}_labels.txt").write_text("".join(f"{y}\n" for _, y in rows))
    return folder


@pytest.fixture(scope="session")
def tiny_run_dir(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> Path:
    """A run folder made by `doratweet run` on the tiny model (2 steps): for tests of what uses a run."""
    from doratweet.cli import main

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    assert main(["--quiet", "run", "--model", str(tiny_model_dir), "--data", str(tiny_data_dir), "--out", str(out),
                 "--max-steps", "2", "--rank", "4", "--alpha", "8", "--batch-size", "4"]) == 0
    return out
