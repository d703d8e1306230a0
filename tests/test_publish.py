"""`doratweet push`: what goes where, the dry run, the Hub calls (recorded, never sent) and the errors."""

from __future__ import annotations

import json

import pytest

from doratweet.cli import main
from doratweet.errors import UserError
from doratweet.publish import push_run, upload_plan


HUB_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def run_dir(tmp_path):
    """The files of a run folder `push` looks at; their contents do not matter here."""
    run = tmp_path / "run"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "README.md", "metrics.json",
                 "plots/confusion_after.png", "plots/training_curves.png", "predictions/test_after.txt",
                 "train_log.jsonl", "checkpoint/optimizer.pt"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(name)
    (run / "metrics.json").write_text(json.dumps({"base_model_id": HUB_MODEL}))
    (run / "adapter/adapter_config.json").write_text(json.dumps({"base_model_name_or_path": HUB_MODEL}))
    return run


class RecordingHfApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **options):
        self.calls.append(("create_repo", repo_id, options))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **options):
        self.calls.append(("create_commit", repo_id, [(op.path_in_repo, op.path_or_fileobj) for op in operations]))


def use_hf_api(monkeypatch, api) -> None:
    """Make `huggingface_hub.HfApi()` return `api`. A class, not a lambda: transformers, imported by
    `--quiet`, evaluates `HfApi | None` at import time."""
    class FakeHfApi:
        def __new__(cls, *args, **kwargs):
            return api

    monkeypatch.setattr("huggingface_hub.HfApi", FakeHfApi)


EXPECTED_REPO_PATHS = ["README.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                       "metrics.json", "plots/confusion_after.png", "plots/training_curves.png",
                       "predictions/test_after.txt"]


def test_the_plan_mirrors_the_run_folder_without_checkpoints_or_logs(run_dir):
    plan = upload_plan(run_dir)
    assert [remote for _, remote in plan] == EXPECTED_REPO_PATHS
    assert all(local == run_dir / remote for local, remote in plan)


def test_dry_run_lists_local_to_repo_paths_and_touches_nothing(run_dir, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.HfApi", lambda *a, **k: pytest.fail("dry run built an HfApi"))
    assert main(["push", str(run_dir), "--repo", "me/tweets", "--dry-run", "--private"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "private model repo me/tweets" in out[0]
    assert out[1:] == [f"  {run_dir / p} -> me/tweets/{p}" for p in EXPECTED_REPO_PATHS]


def test_push_creates_the_repo_and_uploads_everything_in_one_commit(run_dir, monkeypatch, capsys):
    api = RecordingHfApi()
    use_hf_api(monkeypatch, api)
    assert main(["--quiet", "push", str(run_dir), "--repo", "me/tweets", "--private"]) == 0
    assert capsys.readouterr().out.strip() == "https://huggingface.co/me/tweets"
    (create, repo, options), (commit, repo2, files) = api.calls
    assert (create, repo, commit, repo2) == ("create_repo", "me/tweets", "create_commit", "me/tweets")
    assert options["private"] is True and options["exist_ok"] is True
    assert files == [(p, str(run_dir / p)) for p in EXPECTED_REPO_PATHS]


def test_a_missing_run_folder_is_one_line(tmp_path, capsys):
    assert main(["push", str(tmp_path / "nope"), "--repo", "me/tweets", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such run folder" in err


def test_a_run_without_an_adapter_is_refused(run_dir):
    (run_dir / "adapter" / "adapter_config.json").unlink()
    with pytest.raises(UserError, match="adapter_config.json"):
        push_run(run_dir, "me/tweets", dry_run=True)


@pytest.mark.parametrize("repo", ["tweets", "me/", "/tweets", "me/twe ets", "a/b/c", "me/x..y"])
def test_a_malformed_repo_id_is_refused(run_dir, repo):
    with pytest.raises(UserError, match="--repo"):
        push_run(run_dir, repo, dry_run=True)


def test_offline_push_is_one_clear_line(run_dir, monkeypatch, capsys):
    class OfflineApi(RecordingHfApi):
        def create_repo(self, repo_id, **options):
            raise ConnectionError("offline mode is enabled")

    use_hf_api(monkeypatch, OfflineApi())
    assert main(["push", str(run_dir), "--repo", "me/tweets"]) == 2
    assert "cannot reach the Hub" in capsys.readouterr().err


def test_only_the_allow_list_goes_up_never_hidden_or_other_files(run_dir):
    for name in ("adapter/.env", "plots/.hidden.png", ".git/config", ".env", "adapter/notes.txt",
                 "adapter/training_args.bin", "plots/notes.txt", "predictions/.cache.txt", "secrets.json"):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("HF_TOKEN=hf_secret")
    assert [remote for _, remote in upload_plan(run_dir)] == EXPECTED_REPO_PATHS


@pytest.mark.parametrize("name", ["plots/curves.png", "README.md", "metrics.json", "adapter/adapter_config.json",
                                  "predictions/test_before.txt"])
def test_a_link_leaving_the_run_folder_is_refused_in_one_line_naming_it(run_dir, tmp_path, capsys, name):
    secret = tmp_path / "bashrc"
    secret.write_text("export HF_TOKEN=hf_secret")
    link = run_dir / name
    link.unlink(missing_ok=True)
    link.symlink_to(secret)
    assert main(["push", str(run_dir), "--repo", "me/tweets", "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert "hf_secret" not in captured.out + captured.err and captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and name in captured.err and "outside the run folder" in captured.err


def test_a_link_inside_the_run_folder_uploads_the_file_it_names(run_dir):
    (run_dir / "plots" / "confusion_after.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"picture")
    (run_dir / "plots" / "latest.png").symlink_to(run_dir / "plots" / "confusion_after.png")
    plan = dict((remote, local) for local, remote in upload_plan(run_dir))
    assert plan["plots/latest.png"] == run_dir / "plots" / "confusion_after.png"


@pytest.mark.parametrize("name, target", [
    ("plots/env.png", "../adapter/.env"),  # a hidden file
    ("plots/config.png", "../adapter/adapter_config.json"),  # allowed, but not a plot
    ("plots/log.png", "../train_log.jsonl"),  # not on the allow-list
    ("predictions/notes.txt", "../checkpoint/optimizer.pt"),
    ("metrics.json", "train_log.jsonl"),
    ("README.md", "metrics.json"),  # allowed, but not as the card
])
def test_a_link_inside_the_run_folder_to_a_file_push_would_not_upload_is_refused(run_dir, capsys, name, target):
    (run_dir / "adapter" / ".env").write_text("HF_TOKEN=hf_secret")
    link = run_dir / name
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    assert main(["push", str(run_dir), "--repo", "me/tweets", "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "hf_secret" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and name in captured.err
    assert "which push does not upload there" in captured.err


def test_the_dry_run_says_public_by_default(run_dir, capsys):
    assert main(["push", str(run_dir), "--repo", "me/tweets", "--dry-run"]) == 0
    assert "would create public model repo me/tweets" in capsys.readouterr().out.splitlines()[0]


def uploaded(run_dir, monkeypatch) -> dict[str, bytes]:
    api = RecordingHfApi()
    use_hf_api(monkeypatch, api)
    assert main(["--quiet", "push", str(run_dir), "--repo", "me/tweets"]) == 0
    (_, _, _), (_, _, files) = api.calls
    return {remote: source if isinstance(source, bytes) else open(source, "rb").read() for remote, source in files}


def test_local_paths_in_metrics_and_adapter_config_go_up_as_names(run_dir, monkeypatch):
    (run_dir / "metrics.json").write_text(json.dumps({
        "base_model_id": "/home/me/models/tiny", "model_source": "/home/me/.cache/doratweet/models/tiny",
        "data": {"spec": "/home/me/data/tweets.csv", "sizes": {"test": 3}}, "preset": "quick"}))
    (run_dir / "adapter/adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": "/home/me/models/tiny", "r": 4,
        "doratweet": {"model_spec": "/home/me/models/tiny", "init_adapter": "/home/me/runs/a/adapter"}}))
    files = uploaded(run_dir, monkeypatch)
    assert not any(b"/home/me" in content for content in files.values())
    metrics, config = json.loads(files["metrics.json"]), json.loads(files["adapter/adapter_config.json"])
    assert (metrics["base_model_id"], metrics["model_source"], metrics["data"]["spec"]) == ("tiny", "tiny", "tweets.csv")
    assert metrics["preset"] == "quick" and metrics["data"]["sizes"] == {"test": 3}
    assert config["base_model_name_or_path"] is None and config["r"] == 4
    assert config["doratweet"] == {"model_spec": "tiny", "init_adapter": "adapter"}
    assert (run_dir / "metrics.json").read_text().count("/home/me") == 3  # the local files stay as they are


def test_files_without_local_paths_go_up_unchanged(run_dir, monkeypatch):
    files = uploaded(run_dir, monkeypatch)
    assert all(files[remote] == (run_dir / remote).read_bytes() for remote in EXPECTED_REPO_PATHS)


def test_a_card_showing_a_local_path_is_refused_in_one_line(run_dir, capsys):
    (run_dir / "metrics.json").write_text(json.dumps({"base_model_id": "/home/me/models/tiny"}))
    (run_dir / "README.md").write_text("---\nbase_model: /home/me/models/tiny\n---\n")
    assert main(["push", str(run_dir), "--repo", "me/tweets", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "README.md" in err and "doratweet report" in err


def test_a_tampered_metrics_json_is_refused_before_anything_goes_up(run_dir, capsys):
    (run_dir / "metrics.json").write_text("[]")
    assert main(["push", str(run_dir), "--repo", "me/tweets", "--dry-run"]) == 2
    assert "metrics.json" in capsys.readouterr().err
