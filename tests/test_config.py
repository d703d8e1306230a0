"""The configuration tree: one definition per setting, checked once, immutable, and the command line made from it."""

from __future__ import annotations

import dataclasses
import json

import pytest
from helpers import build_tiny_model

from doratweet.adapters import AdapterConfig, add_adapters, load_adapter, save_adapter
from doratweet.cli import build_parser
from doratweet.config import PRESETS, DataConfig, Round, RunConfig, TrainConfig
from doratweet.errors import UserError


def verb_help(verb: str) -> str:
    verbs = build_parser()._subparsers._group_actions[0]  # argparse keeps the sub-commands there
    return verbs.choices[verb].format_help()


def documented_fields(config) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config) if "help" in f.metadata]


def flag_of(field: dataclasses.Field) -> str:
    """The option's name: --field-name, or the metadata's flag; a switch that is on by default is --no-NAME."""
    flag = field.metadata.get("flag", "--" + field.name.replace("_", "-"))
    return "--no-" + flag[2:] if field.default is True else flag


@pytest.mark.parametrize("verb", ["train", "run"])
def test_every_documented_field_is_an_option_with_its_help(verb):
    text = " ".join(verb_help(verb).split())  # argparse wraps lines
    for config in (AdapterConfig, TrainConfig, DataConfig):
        for field in documented_fields(config):
            if verb not in field.metadata.get("verbs", (verb,)):
                assert flag_of(field) not in text
                continue
            assert f"{flag_of(field)} " in text, flag_of(field)
            assert " ".join(field.metadata["help"].split()) in text, flag_of(field)


def test_train_shows_the_defaults_of_a_training_config():
    text = " ".join(verb_help("train").split())
    defaults = TrainConfig()
    assert f"(PEFT's formula) (default: {defaults.adapter.dropout})" in text  # the training default, not the API's
    assert f"(default: {defaults.lr})" in text
    assert "--fsdp" in text and "--fsdp" not in " ".join(verb_help("run").split())


def test_a_changed_config_is_checked_again():
    config = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 0.5
    with pytest.raises(UserError, match=r"^--lr 2.0: must be in \(0, 1\)"):
        dataclasses.replace(config, lr=2.0)
    with pytest.raises(UserError, match=r"^--rank 0: must be 1 or more$"):
        dataclasses.replace(config.adapter, rank=0)


def test_flat_settings_keep_the_order_the_summary_and_checkpoints_record():
    flat = TrainConfig().flat()
    shape = [f.name for f in dataclasses.fields(AdapterConfig)]
    assert shape[:6] == ["method", "rank", "alpha", "dropout", "targets", "use_rslora"]
    assert list(flat)[: len(shape)] == shape
    assert "adapter" not in flat and list(flat)[len(shape)] == "epochs"


def test_options_given_on_the_command_line_win_over_every_round_of_a_preset(monkeypatch, tmp_path):
    from doratweet.cli import run_config

    first = TrainConfig(AdapterConfig(rank=4, alpha=8, dropout=0.0), lr=1e-2, eval_every=3)
    monkeypatch.setitem(PRESETS, "quick", dataclasses.replace(
        PRESETS["quick"], rounds=(Round(6, first), Round(None, dataclasses.replace(first, lr=5e-3, eval_every=5)))))
    args = build_parser().parse_args(["run", "--preset", "quick", "--out", str(tmp_path), "--rank", "2",
                                      "--eval-every", "7"])
    config = run_config(args, PRESETS["quick"])
    assert [r.train.adapter.rank for r in config.rounds] == [2, 2]
    assert [r.train.eval_every for r in config.rounds] == [7, 7]
    assert [r.train.lr for r in config.rounds] == [1e-2, 5e-3]  # not given: each round keeps its own


def test_overwrite_and_resume_together_are_refused_when_the_config_is_made(tmp_path):
    with pytest.raises(UserError, match="--overwrite and --resume: choose one"):
        RunConfig(out=tmp_path, model="x", overwrite=True, resume=True)


def test_data_options_an_empty_id_column_turns_the_check_off():
    assert DataConfig(id_column="").id_column is None
    args = build_parser().parse_args(["train", "--out", "x", "--id-column", ""])
    from doratweet.cli import data_config

    assert data_config(args).id_column is None


def test_a_regular_expression_of_targets_is_saved_as_peft_reads_it(tmp_path):
    model, _ = build_tiny_model()
    add_adapters(model, AdapterConfig(rank=4, alpha=8, targets=r".*\.(q_proj|v_proj)"))
    save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"] == r".*\.(q_proj|v_proj)"
    fresh, _ = build_tiny_model()
    load_adapter(fresh, tmp_path / "a")
    adapted = sorted(name.rsplit(".", 1)[-1] for name, m in fresh.named_modules() if hasattr(m, "lora_A"))
    assert adapted == ["q_proj", "q_proj", "v_proj", "v_proj"]


def test_the_python_api_runs_a_config_tree(tiny_model_dir, tiny_data_dir, tmp_path):
    from doratweet.pipeline import run_pipeline

    train = TrainConfig(AdapterConfig(rank=4, alpha=8), batch_size=4, lr=1e-2, max_steps=2)
    config = RunConfig(out=tmp_path / "run", model=str(tiny_model_dir), rounds=(Round(None, train),),
                       data=DataConfig(spec=str(tiny_data_dir)), test_limit=4, generate_limit=2, progress=False)
    metrics = run_pipeline(config)
    assert metrics["training"]["steps"] == 2 and metrics["training"]["rank"] == 4
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["doratweet"]["model_spec"] == str(tiny_model_dir)


def test_the_cli_and_the_python_api_build_the_same_config(tiny_model_dir, tiny_data_dir, tmp_path):
    from doratweet.cli import run_config

    args = build_parser().parse_args(["train", "--model", str(tiny_model_dir), "--data", str(tiny_data_dir),
                                      "--out", str(tmp_path), "--rank", "4", "--alpha", "8", "--lr", "0.01"])
    by_hand = RunConfig(out=tmp_path, model=str(tiny_model_dir), data=DataConfig(spec=str(tiny_data_dir)),
                        rounds=(Round(None, TrainConfig(AdapterConfig(rank=4, alpha=8, dropout=0.05), lr=0.01)),))
    assert run_config(args) == by_hand


def test_runs_evaluation_batch_size_is_not_the_validation_batch_size_of_training(tmp_path):
    from doratweet.cli import run_config

    args = build_parser().parse_args(["run", "--out", str(tmp_path), "--eval-batch-size", "3"])
    config = run_config(args, PRESETS["quick"])
    assert config.eval_batch_size == 3
    assert config.train.eval_batch_size == TrainConfig().eval_batch_size


def test_an_adapter_with_an_alpha_training_refuses_still_loads(tmp_path):
    model, _ = build_tiny_model()
    add_adapters(model, AdapterConfig(rank=4, alpha=1e6))  # a saved adapter may have any positive alpha
    save_adapter(model, tmp_path / "a")
    load_adapter(build_tiny_model()[0], tmp_path / "a")
    with pytest.raises(UserError, match=r"^--alpha 1000000.0: must be a positive number, at most 100000$"):
        TrainConfig(AdapterConfig(alpha=1e6))


def test_a_regular_expression_of_targets_is_kept_whole_when_an_adapter_is_trained_further(tmp_path):
    from doratweet.cli import run_config

    model, _ = build_tiny_model()
    add_adapters(model, AdapterConfig(rank=4, alpha=8, targets=r".*proj"))
    save_adapter(model, tmp_path / "a")
    args = build_parser().parse_args(["train", "--out", str(tmp_path / "b"), "--init-adapter", str(tmp_path / "a"),
                                      "--model", "tiny"])
    config = run_config(args)
    assert config.train.adapter.targets == r".*proj"
    args = build_parser().parse_args(["train", "--out", str(tmp_path / "b"), "--init-adapter", str(tmp_path / "a"),
                                      "--model", "tiny", "--targets", "q_proj"])
    with pytest.raises(UserError, match=r"^--targets \('q_proj',\): the --init-adapter .* has .\*proj; drop --targets"):
        run_config(args)


def test_training_precision_is_an_option_of_three_choices(tmp_path):
    from doratweet.cli import run_config

    parser = build_parser()
    for text, value in (("auto", None), ("fp32", False), ("bf16", True)):
        args = parser.parse_args(["train", "--out", str(tmp_path), "--train-precision", text])
        assert run_config(args, None).train.bf16 is value
    assert "--train-precision {auto,fp32,bf16}" in " ".join(verb_help("train").split())
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--out", str(tmp_path), "--train-precision", "fp16"])
