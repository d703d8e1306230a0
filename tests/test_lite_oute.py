"""The course's model, Lite-Oute-1-300M-Instruct (Mistral architecture), cannot be downloaded here: the whole
pipeline runs on a random-weight model with its exact shape and special-token layout instead.

What a user with internet runs (docs/results.md has the result row, "not run here"):
    doratweet run --model OuteAI/Lite-Oute-1-300M-Instruct --method dora --targets k_proj,v_proj --rank 8 --alpha 16
"""

import json

import pytest
from helpers import CHATML, TWEETS

from doratweet.cli import main
from doratweet.predict import SentimentClassifier

pytestmark = pytest.mark.slow  # a 300M-parameter model, trained and evaluated on CPU

# The fields the course names; the rest are transformers' Mistral defaults.
LITE_OUTE_CONFIG = dict(vocab_size=32768, hidden_size=896, intermediate_size=3584, num_hidden_layers=20,
                        num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096,
                        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
IM_END, EOS = 32000, 2


def lite_oute_tokenizer():
    """A small byte-level BPE laid out like Lite-Oute's: <unk> <s> </s> = 0 1 2, ChatML's <|im_end|> = 32000."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    trained.train_from_iterator([t for t, _ in TWEETS] + ["negative neutral positive system user assistant"] * 5,
                                trainer)
    learned = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": EOS}
    for piece, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        vocab[piece] = len(vocab)
    vocab.update({"<|im_end|>": IM_END, "<|im_start|>": IM_END + 1})
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", additional_special_tokens=["<|im_end|>", "<|im_start|>"],
                                   chat_template=CHATML)


@pytest.fixture(scope="module")
def lite_oute_dir(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    folder = tmp_path_factory.mktemp("lite-oute-random")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MistralConfig(**LITE_OUTE_CONFIG))
    model.generation_config.eos_token_id = EOS
    model.to(torch.bfloat16).save_pretrained(folder)  # half the bytes to write; loaded back as fp32
    lite_oute_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def course_run(lite_oute_dir, tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lite-oute-run") / "run"
    assert main(["--quiet", "run", "--model", str(lite_oute_dir), "--data", str(tiny_data_dir), "--out", str(out),
                 "--method", "dora", "--targets", "k_proj,v_proj", "--rank", "8", "--alpha", "16", "--layers", "all",
                 "--max-steps", "2", "--batch-size", "4", "--test-limit", "4", "--generate-limit", "2"]) == 0
    return out


def test_the_course_setting_trains_dora_on_k_and_v_of_all_20_layers(course_run):
    config = json.loads((course_run / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_dora"]) == (8, 16, True)
    assert config["target_modules"] == ["k_proj", "v_proj"]
    training = json.loads((course_run / "metrics.json").read_text())["training"]
    # Per layer and projection (896 -> 448 with 8 KV heads of 56): A 8x896, B 448x8, magnitude 448.
    assert training["trainable_parameters"] == 20 * 2 * (8 * 896 + 448 * 8 + 448)
    assert training["total_parameters"] == 299_601_792 + training["trainable_parameters"]


def test_the_run_evaluates_both_modes_and_writes_the_card(course_run):
    metrics = json.loads((course_run / "metrics.json").read_text())
    for stage in ("before", "after"):
        assert metrics["results"][stage]["test"]["score"]["n"] == 4
        assert metrics["results"][stage]["test"]["generate"]["n"] == 2
    assert (course_run / "README.md").read_text().startswith("---\n")


def test_answers_end_at_im_end_and_generation_also_stops_at_eos_2(course_run, lite_oute_dir):
    classifier = SentimentClassifier.load(course_run, model=str(lite_oute_dir))
    fmt = classifier.prompt_format
    assert fmt.end_of_turn_id == IM_END and all(answer[-1] == IM_END for answer in fmt.answer_ids)
    assert fmt.stop_ids() == [EOS, IM_END]
    assert len(classifier.predict(["great game tonight", "my train is late again"])) == 2
