"""`doratweet push`: what goes where, the dry run, the Hub calls (recorded, never sent) and the errors."""

from __future__ import annotations

import pytest

from doratweet.cli import main
from doratweet.errors import UserError
from doratweet.publish import push_run, upload_plan


@pytest.fixture
def run_dir(tmp_path):
    """The files of a run folder `push` looks at; their contents do not matter here."""
    run = tmp_path / "run"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "README.md", "metrics.json",
                 "plots/confusion_after.png", "plots/training_curves.png", "train_log.jsonl",
                 "checkpoint/optimizer.pt"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(name)
    return run


class RecordingHfApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **options):
        self.calls.append(("create_repo", repo_id, options))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **options):
        self.calls.append(("create_commit", repo_id, [(op.path_in_repo, op.path_or_fileobj) for op in operations]))


EXPECTED_REPO_PATHS = ["README.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                       "metrics.json", "plots/confusion_after.png", "plots/training_curves.png"]


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
    monkeypatch.setattr("huggingface_hub.HfApi", lambda *a, **k: api)
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

    monkeypatch.setattr("huggingface_hub.HfApi", lambda *a, **k: OfflineApi())
    assert main(["push", str(run_dir), "--repo", "me/tweets"]) == 2
    assert "cannot reach the Hub" in capsys.readouterr().err
