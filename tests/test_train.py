"""The training loop: it learns, it is reproducible, and an interrupted run resumes to the same result."""

import json
import shutil

import pytest
import torch
from helpers import TWEETS, build_tiny_model
from helpers import norms_in_the_models_dtype
from safetensors.torch import load_file

from doratweet.data import Split
from doratweet.prompts import make_prompt_format
from doratweet.adapters import AdapterConfig
from doratweet.config import TrainConfig
from doratweet.train import epoch_batches, train

TRAIN = Split("train", [t for t, _ in TWEETS], [y for _, y in TWEETS], "test")
VAL = Split("validation", [t for t, _ in TWEETS[:6]], [y for _, y in TWEETS[:6]], "test")


def run(tmp_path, name, resume=False, on_step=None, lr=5e-3, val=None, **options):
    model, tokenizer = build_tiny_model()
    config = TrainConfig(AdapterConfig(rank=4, alpha=8, dropout=0.1), batch_size=4, lr=lr, log_every=1, **options)
    summary = train(model, make_prompt_format(tokenizer), TRAIN, val, config, tmp_path / name,
                    resume=resume, progress=False, on_step=on_step)
    return summary, load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")


def test_loss_goes_down(tmp_path):
    run(tmp_path, "a", max_steps=30, lr=1e-2)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_same_seed_gives_the_same_adapter(tmp_path):
    _, first = run(tmp_path, "a", max_steps=5, seed=3)
    _, second = run(tmp_path, "b", max_steps=5, seed=3)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_interrupted_run_resumes_to_the_same_adapter(tmp_path):
    _, uninterrupted = run(tmp_path, "full", max_steps=8, grad_accum=2)

    def interrupt(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "resumed", max_steps=8, grad_accum=2, on_step=interrupt)
    assert (tmp_path / "resumed" / "checkpoint" / "step-00000003" / "state.json").is_file()  # Ctrl-C saved one
    summary, resumed = run(tmp_path, "resumed", resume=True, max_steps=8, grad_accum=2)
    assert summary["steps"] == 8
    # The same operations on the same shapes in one process: nothing may differ, not even by rounding.
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


def test_validation_keeps_the_best_adapter_and_logs_it(tmp_path):
    summary, _ = run(tmp_path, "a", max_steps=6, eval_every=2, val=VAL)
    evals = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()
             if "val_macro_f1" in line]
    assert [e["step"] for e in evals] == [2, 4, 6]
    assert summary["best_val_macro_f1"] == max(e["val_macro_f1"] for e in evals)
    assert summary["best_step"] == next(e["step"] for e in evals if e["val_macro_f1"] == summary["best_val_macro_f1"])


def test_batches_are_deterministic_shuffled_and_length_bucketed():
    lengths = list(range(100))
    first = epoch_batches(lengths, 10, seed=1, epoch=0)
    assert first == epoch_batches(lengths, 10, seed=1, epoch=0)
    assert first != epoch_batches(lengths, 10, seed=1, epoch=1)
    assert sorted(i for b in first for i in b) == lengths
    assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) < 20 for b in first)


def test_shared_prefix_loss_and_gradients_equal_the_full_sequence_ones():
    """In float64, where the two orders of summation differ by ~1e-16 relative on any CPU: 1e-10 leaves 1e6 times
    that, and a prefix seen at the wrong positions or without its gradient is off by more than 1e-3."""
    from doratweet.adapters import add_adapters, adapter_parameters
    from doratweet.evaluate import common_prefix
    from doratweet.train import answer_loss, encode_split, right_pad

    model, tokenizer = build_tiny_model(dtype=torch.float64)
    add_adapters(model, rank=4, alpha=8)
    fmt = make_prompt_format(tokenizer)
    examples = encode_split(fmt, TRAIN)
    prefix = common_prefix(fmt, [ids for ids, _ in examples])
    assert len(prefix) > 5

    with norms_in_the_models_dtype():  # the prefix's gradient is summed before its norm, the full ones after it
        full = answer_loss(model, *right_pad(examples, 0, "cpu"))
        full_grads = torch.autograd.grad(full, adapter_parameters(model)[1::3])  # the B matrices
        rests = [(ids[len(prefix):], t[len(prefix):]) for ids, t in examples]
        shared = answer_loss(model, *right_pad(rests, 0, "cpu"), prefix)
        shared_grads = torch.autograd.grad(shared, adapter_parameters(model)[1::3])
    assert shared.item() == pytest.approx(full.item(), rel=1e-10)
    for a, b in zip(shared_grads, full_grads):
        assert (a - b).abs().max() <= 1e-10 * b.abs().max()


def train_cli(model_dir, data_dir, out, *extra) -> list[str]:
    return ["--quiet", "train", "--model", str(model_dir), "--data", str(data_dir), "--out", str(out),
            "--batch-size", "4", "--dropout", "0", *extra]


def test_init_adapter_goes_on_from_its_weights_with_its_shape_on_the_tweets_after_train_skip(
        tiny_model_dir, tiny_data_dir, tmp_path):
    from doratweet.cli import main

    first = tmp_path / "first"
    assert main(train_cli(tiny_model_dir, tiny_data_dir, first, "--train-limit", "6", "--max-steps", "3",
                          "--lr", "1e-2", "--rank", "4", "--alpha", "8")) == 0
    # A learning rate so small that one AdamW step cannot move a weight by more than 1e-8: the result is the start.
    further = tmp_path / "further"
    assert main(train_cli(tiny_model_dir, tiny_data_dir, further, "--init-adapter", str(first), "--train-skip", "6",
                          "--max-steps", "1", "--lr", "1e-9")) == 0
    start = load_file(first / "adapter" / "adapter_model.safetensors")
    after = load_file(further / "adapter" / "adapter_model.safetensors")
    assert start.keys() == after.keys()
    assert any(k.endswith("lora_B.weight") and t.abs().max() > 1e-4 for k, t in start.items())  # trained, not new
    assert all(torch.allclose(start[k], after[k], atol=1e-8) for k in start)
    config = json.loads((further / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8  # the adapter's shape, not the defaults (16, 32)
    assert config["doratweet"]["train_skip"] == 6
    summary = json.loads((further / "train_summary.json").read_text())
    assert summary["train_examples"] == len(TWEETS) - 6


@pytest.mark.parametrize("extra, expected", [
    (["--rank", "8"], "--rank 8: the --init-adapter"),
    (["--resume"], "--resume: no checkpoint in"),  # resuming a run that began from an adapter needs its checkpoint
    (["--train-skip", "99"], "--train-skip 99: the train split has only 12 rows"),
])
def test_init_adapter_and_train_skip_mistakes_are_one_line(tiny_model_dir, tiny_data_dir, tiny_run_dir, tmp_path,
                                                           capsys, extra, expected):
    from doratweet.cli import main

    out = tmp_path / "further"
    assert main(train_cli(tiny_model_dir, tiny_data_dir, out, "--init-adapter", str(tiny_run_dir), *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert not out.exists()


def test_run_with_init_adapter_trains_it_further_and_says_which_tweets(tiny_model_dir, tiny_data_dir, tiny_run_dir,
                                                                       tmp_path):
    from doratweet.cli import main

    out = tmp_path / "further"
    assert main(["--quiet", "run", "--model", str(tiny_model_dir), "--data", str(tiny_data_dir), "--out", str(out),
                 "--init-adapter", str(tiny_run_dir), "--train-skip", "6", "--max-steps", "1", "--batch-size", "4"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["train_examples"] == len(TWEETS) - 6
    assert metrics["training"]["rank"] == json.loads((tiny_run_dir / "adapter" / "adapter_config.json").read_text())["r"]
    assert metrics["subset_note"].startswith(f"trained on train tweets 7-{len(TWEETS)} of {len(TWEETS)}")


@pytest.fixture
def two_round_preset(monkeypatch):
    """`--preset quick` as a two-round recipe: 6 train tweets, then the other 6 from the first round's adapter."""
    from dataclasses import replace

    from doratweet.config import PRESETS, Preset, Round

    first = TrainConfig(AdapterConfig(rank=4, alpha=8, dropout=0.0), epochs=1, batch_size=4, lr=1e-2, eval_limit=6)
    preset = Preset("quick", train_limit=None, test_limit=4, generate_limit=2,
                    rounds=(Round(6, first), Round(None, replace(first, lr=5e-3))))
    monkeypatch.setitem(PRESETS, "quick", preset)


def test_a_two_round_preset_equals_training_then_training_further(two_round_preset, tiny_model_dir, tiny_data_dir,
                                                                  tmp_path):
    from doratweet.cli import main

    out = tmp_path / "rounds"
    assert main(["--quiet", "run", "--preset", "quick", "--model", str(tiny_model_dir), "--data", str(tiny_data_dir),
                 "--out", str(out)]) == 0
    # The same recipe by hand: train on the first 6 tweets, then go on from that adapter on the rest.
    first, further = tmp_path / "first", tmp_path / "further"
    assert main(train_cli(tiny_model_dir, tiny_data_dir, first, "--train-limit", "6", "--lr", "1e-2",
                          "--rank", "4", "--alpha", "8", "--eval-limit", "6")) == 0
    assert main(train_cli(tiny_model_dir, tiny_data_dir, further, "--init-adapter", str(first), "--train-skip", "6",
                          "--lr", "5e-3", "--eval-limit", "6")) == 0
    for rounds_file, by_hand in ((out / "round-1" / "adapter", first / "adapter"), (out / "adapter", further / "adapter")):
        ours, theirs = (load_file(f / "adapter_model.safetensors") for f in (rounds_file, by_hand))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), rounds_file

    metrics = json.loads((out / "metrics.json").read_text())
    training = metrics["training"]
    assert [r["train_examples"] for r in training["rounds"]] == [6, len(TWEETS) - 6]
    assert [r["lr"] for r in training["rounds"]] == [1e-2, 5e-3]
    assert training["train_examples"] == len(TWEETS) and training["steps"] == 2 + 2
    assert metrics["subset_note"].startswith(f"trained in 2 rounds, on train tweets 1-6, then 7-{len(TWEETS)}")
    card = (out / "README.md").read_text()
    assert f"| round 2 | train tweets 7-{len(TWEETS)}, 2 steps from round 1's best adapter" in card


def test_resume_loads_a_finished_round_instead_of_training_it_again(two_round_preset, tiny_model_dir, tiny_data_dir,
                                                                     tmp_path):
    from doratweet.cli import main

    out = tmp_path / "rounds"
    command = ["--quiet", "run", "--preset", "quick", "--model", str(tiny_model_dir), "--data", str(tiny_data_dir),
               "--out", str(out), "--save-every", "1"]
    assert main(command) == 0
    finished = load_file(out / "adapter" / "adapter_model.safetensors")
    round_one = {f: f.stat().st_mtime_ns for f in (out / "round-1").rglob("*") if f.is_file()}
    # Stopped early in round 2: only its first checkpoint is left, nothing of what the run writes at the end.
    for name in ("adapter", "metrics.json", "README.md", "plots", "predictions"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    checkpoints = sorted((out / "checkpoint").iterdir())
    shutil.rmtree(checkpoints[-1])
    assert main([*command, "--resume"]) == 0
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(finished[k], resumed[k]) for k in finished)
    assert {f: f.stat().st_mtime_ns for f in (out / "round-1").rglob("*") if f.is_file()} == round_one


def test_bf16_training_on_a_cpu_holds_frozen_weights_in_bf16_and_gives_the_model_back_unchanged(tmp_path):
    """--train-precision bf16 on a CPU: while training, the frozen weight matrices are bf16 and attention eager
    (train.HalfWeights); the adapters stay fp32; validation and the caller get the model's own fp32 weights and
    attention back, bit for bit."""
    model, tokenizer = build_tiny_model()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    attention = model.config._attn_implementation
    seen = {}

    def look(step):
        q_proj = model.model.layers[0].self_attn.q_proj
        seen[step] = (q_proj.base.weight.dtype, q_proj.lora_A.dtype, q_proj.magnitude.dtype,
                      model.model.layers[0].input_layernorm.weight.dtype, model.config._attn_implementation)

    config = TrainConfig(AdapterConfig(rank=4, alpha=8, dropout=0.0), batch_size=4, lr=5e-3, max_steps=4,
                         eval_every=2, bf16=True)
    summary = train(model, make_prompt_format(tokenizer), TRAIN, VAL, config, tmp_path / "a", progress=False,
                    on_step=look)
    assert seen[1] == seen[4] == (torch.bfloat16, torch.float32, torch.float32, torch.float32, "eager")
    assert summary["precision"].startswith("bf16")
    after = {k.replace(".base.", "."): v for k, v in model.state_dict().items()}
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    assert model.config._attn_implementation == attention
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log if "val_macro_f1" in line] == [2, 4]


def test_bf16_training_loss_stays_within_bf16_rounding_of_fp32(tmp_path):
    """The same first step in fp32 and in bf16: the loss before any update differs only by rounding the weights and
    activations to bf16 (2^-8 relative each, the same on every CPU: AMX and AVX512-BF16 both multiply bf16 exactly
    and accumulate in fp32). Measured 1e-3 relative on this tiny model (Intel Xeon with AMX); bounded at 2e-2."""
    first_losses = []
    for bf16 in (False, True):
        model, tokenizer = build_tiny_model()
        config = TrainConfig(AdapterConfig(rank=4, alpha=8, dropout=0.0), batch_size=4, lr=5e-3, max_steps=1,
                             log_every=1, bf16=bf16)
        train(model, make_prompt_format(tokenizer), TRAIN, None, config, tmp_path / str(bf16), progress=False)
        first_losses.append(json.loads((tmp_path / str(bf16) / "train_log.jsonl").read_text().splitlines()[0])["loss"])
    fp32, bf16 = first_losses
    assert fp32 != bf16 and abs(bf16 - fp32) / fp32 < 2e-2


def test_training_precision_auto_is_bf16_where_bf16_is_fast_and_never_for_fp64(monkeypatch):
    import doratweet.hardware as hardware

    cpu = torch.device("cpu")
    for fast in (False, True):
        monkeypatch.setattr(hardware, "bf16_is_fast", lambda device, fast=fast: fast)
        assert hardware.bf16_training_pays(cpu, torch.float32) is fast
        assert hardware.bf16_training_pays(cpu, torch.float64) is False


def test_class_weighted_loss_is_the_label_weighted_mean_and_balanced_weights_average_one():
    from doratweet.train import TrainingData, answer_token_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 20, bias=False)
    hidden = torch.randn(3, 5, 8)
    targets = torch.full((3, 5), -100)
    targets[0, 3:] = torch.tensor([4, 7])  # tweet 0: two answer tokens; tweets 1 and 2: one each
    targets[1, 4], targets[2, 2] = 9, 11
    plain = answer_token_loss(head, hidden, targets, 0.0)
    assert torch.allclose(answer_token_loss(head, hidden, targets, 0.0, row_weights=torch.ones(3)), plain,
                          rtol=1e-6, atol=0)
    weights = torch.tensor([0.5, 2.0, 1.0])
    logits = head(hidden[:, :-1])
    per_token = [(0, 2, 4), (0, 3, 7), (1, 3, 9), (2, 1, 11)]  # (tweet, position, next token)
    losses = torch.stack([torch.nn.functional.cross_entropy(logits[b, t], torch.tensor(y)) for b, t, y in per_token])
    token_weights = torch.tensor([weights[b] for b, _, _ in per_token])
    expected = (losses * token_weights).sum() / token_weights.sum()
    # The reference projects every position, the loss only the answer ones: other matmul shapes, which may take other
    # kernels (AMX, AVX-512) and round differently in the last bits; 1e-5 is far below any weighting mistake.
    assert torch.allclose(answer_token_loss(head, hidden, targets, 0.0, row_weights=weights), expected, rtol=1e-5)

    data = TrainingData([], [], [], [], labels=[0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2])
    weights = data.class_weights()
    assert weights == pytest.approx([1.0, 2.0, 2 / 3])  # 12 / (3 x count)
    assert sum(weights[y] for y in data.labels) / len(data.labels) == pytest.approx(1.0)


def test_class_weighted_training_weights_the_loss_of_each_tweet_by_its_label(tmp_path, monkeypatch):
    import doratweet.train as train_module

    seen = []
    loss = train_module.answer_loss

    def recording(*args, **kwargs):
        seen.append(kwargs.get("row_weights"))
        return loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "answer_loss", recording)
    run(tmp_path, "plain", max_steps=2)
    assert seen == [None, None]
    seen.clear()
    run(tmp_path, "weighted", max_steps=2, class_weighted=True)
    counts = torch.bincount(torch.tensor(TRAIN.labels), minlength=3).float()
    expected = len(TRAIN.labels) / (3 * counts)
    assert len(seen) == 2 and all(w is not None and set(w.tolist()) <= set(expected.tolist()) for w in seen)


def test_report_to_tensorboard_writes_the_training_log_as_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, tokenizer = build_tiny_model()
    config = TrainConfig(AdapterConfig(rank=4, alpha=8), batch_size=4, lr=5e-3, log_every=1, max_steps=4,
                         eval_every=2)
    train(model, make_prompt_format(tokenizer), TRAIN, VAL, config, tmp_path / "a", progress=False,
          report_to="tensorboard")
    lines = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "a" / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert losses == [(x["step"], pytest.approx(x["loss"])) for x in lines if "loss" in x]
    f1 = [(e.step, e.value) for e in events.Scalars("eval/macro_f1")]
    assert f1 == [(x["step"], pytest.approx(x["val_macro_f1"])) for x in lines if "val_macro_f1" in x]
    assert "train/lr" in events.Tags()["scalars"]
