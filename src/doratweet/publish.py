"""`doratweet push`: put a run's adapter, model card and plots in a Hugging Face Hub model repo.

The repo mirrors the run folder's layout (`README.md`, `adapter/`, `plots/`, `metrics.json`, `predictions/`),
which is what the model card's links and its "How to use" section (`subfolder="adapter"`) expect. Only an
allow-list goes up (`upload_plan`): never a hidden file, never anything else a user keeps in the folder, never
a file reached through a link that leaves the folder. Local paths never go up: metrics.json and
adapter_config.json go up with names in their place (`report.public_metrics`, `report.public_adapter_config`),
and a card that still shows one is refused. Everything goes up in one commit, so the repo never shows
a card without its adapter. The token is huggingface_hub's usual one (`HF_TOKEN`, or `hf auth login`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from .errors import UserError, first_line
from .report import (
    file_inside,
    load_adapter_config,
    load_metrics,
    public_adapter_config,
    public_metrics,
    public_name,
)
from .run_folder import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_DIR,
    ADAPTER_WEIGHTS_FILE,
    CARD_FILE,
    METRICS_FILE,
    PLOTS_DIR,
    PREDICTIONS_DIR,
    is_png,
)

log = logging.getLogger("doratweet")


# The Hub's rule for names: letters, digits, '-', '_', '.'; no leading/trailing '-' or '.', no '--' or '..'.
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
# What a run folder may publish: (folder, name pattern). The PEFT files, the card, metrics, plots, predictions.
ALLOWED = [("", re.escape(CARD_FILE)),
           (ADAPTER_DIR, f"{re.escape(ADAPTER_CONFIG_FILE)}|{re.escape(ADAPTER_WEIGHTS_FILE)}"),
           ("", re.escape(METRICS_FILE)),
           (PLOTS_DIR, r"[^.].*\.png"), (PREDICTIONS_DIR, r"[^.].*\.txt")]


def upload_plan(run_dir: str | Path) -> list[tuple[Path, str]]:
    """(real file, path in the repo) for every file `push` uploads, in a stable order: the files of `ALLOWED`
    that are regular files or links staying inside the run folder; a link leaving it is refused."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder; pass the folder `doratweet run --out` wrote")
    plan = []
    for folder, pattern in ALLOWED:
        names = sorted(path.name for path in (run_dir / folder).iterdir()) if (run_dir / folder).is_dir() else []
        for name in names:
            if re.fullmatch(pattern, name):
                remote = f"{folder}/{name}" if folder else name
                real = file_inside(run_dir, remote)
                if real is not None:
                    refuse_link_to_unpublished(run_dir, remote, real)
                    plan.append((real, remote))
    uploaded = {remote for _, remote in plan}
    if f"{ADAPTER_DIR}/{ADAPTER_CONFIG_FILE}" not in uploaded:
        raise UserError(f"{run_dir}: no {ADAPTER_DIR}/{ADAPTER_CONFIG_FILE}; push a run folder whose training finished")
    if CARD_FILE not in uploaded:
        raise UserError(f"{run_dir}: no {CARD_FILE} (model card); write it with `doratweet report {run_dir}`")
    return plan


def _same_rule(relative: str, remote: str) -> bool:
    """Whether `relative` is allowed by the entry of `ALLOWED` that allows `remote`: a plot names a plot."""
    folder, _, name = relative.rpartition("/")
    remote_folder, _, remote_name = remote.rpartition("/")
    return folder == remote_folder and any(folder == allowed_folder and re.fullmatch(pattern, name) and
                                           re.fullmatch(pattern, remote_name) for allowed_folder, pattern in ALLOWED)


def refuse_link_to_unpublished(run_dir: Path, remote: str, real: Path) -> None:
    """A link inside the run folder goes up only when the file it names would go up itself under the same rule
    (not hidden, in the same folder; a plot is a PNG): else a link would publish a `.env` or the raw adapter config."""
    relative = real.relative_to(run_dir.resolve()).as_posix()
    if relative == remote:
        return
    is_plot = remote.startswith(f"{PLOTS_DIR}/")
    if _same_rule(relative, remote) and (not is_plot or is_png(real)):
        return
    raise UserError(f"{run_dir / remote}: a link to {relative}, which push does not upload there"
                    f"{' (a plot is a PNG in plots/)' if is_plot else ''}; replace the link with a copy of the file "
                    "it should upload, or remove it")


def public_plan(run_dir: str | Path, plan: list[tuple[Path, str]]) -> list[tuple[Path | bytes, str]]:
    """The plan with metrics.json and adapter_config.json as the bytes to upload where they record local paths
    (the files in the run folder stay as they are: `predict --run` needs them); a card that shows one of those
    paths, or the run folder's own, is refused."""
    run_dir = Path(run_dir)
    local_paths = {str(run_dir.resolve())}
    public: list[tuple[Path | bytes, str]] = []
    for real, remote in plan:
        if remote == METRICS_FILE:
            load_metrics(run_dir)  # a tampered file is refused, in one line naming the field
            document = json.loads(real.read_bytes().removeprefix(b"\xef\xbb\xbf"))
            shown = public_metrics(document)
            local_paths |= {document.get(key) for key in ("base_model_id", "model_source")}
            spec = (document.get("data") or {}).get("spec")
            local_paths |= {part.rpartition("=")[2] for part in spec.split(",")} if isinstance(spec, str) else set()
        elif remote == f"{ADAPTER_DIR}/{ADAPTER_CONFIG_FILE}":
            document = load_adapter_config(run_dir)
            shown = public_adapter_config(document)
            own = document.get("doratweet") if isinstance(document.get("doratweet"), dict) else {}
            local_paths |= {document.get("base_model_name_or_path"), own.get("model_spec"), own.get("init_adapter")}
        else:
            public.append((real, remote))
            continue
        public.append((real if shown == document else json.dumps(shown, indent=2, ensure_ascii=False).encode() + b"\n",
                       remote))
    local_paths = {path for path in local_paths if isinstance(path, str) and public_name(path) != path}
    card = dict((remote, real) for real, remote in plan)[CARD_FILE].read_text(encoding="utf-8", errors="replace")
    for path in sorted(local_paths):
        if path in card:
            raise UserError(f"{run_dir / CARD_FILE}: shows the local path {path}; rebuild the card with "
                            f"`doratweet report {run_dir}` (it shows names instead), then push again")
    return public


def push_run(run_dir: str | Path, repo_id: str, *, private: bool = False, dry_run: bool = False,
             api=None) -> str | None:
    """Upload the run to `repo_id` (created if needed) and return the repo's URL; with `dry_run`, print the
    plan and return None without importing or contacting anything."""
    if not REPO_ID.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id or repo_id.endswith((".", "-")):
        raise UserError(f"--repo {repo_id!r}: expected user/name (letters, digits, '-', '_', '.'), e.g. me/doratweet-sentiment")
    plan = public_plan(run_dir, upload_plan(run_dir))
    if dry_run:
        print(f"would create {'private' if private else 'public'} model repo {repo_id} (if missing) and upload:")
        for source, remote in plan:
            shown = f"{Path(run_dir) / remote} (local paths as names)" if isinstance(source, bytes) else source
            print(f"  {shown} -> {repo_id}/{remote}")
        return None

    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    api = api or HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.create_commit(repo_id, [CommitOperationAdd(path_in_repo=remote, path_or_fileobj=source if
                                                       isinstance(source, bytes) else str(source))
                                    for source, remote in plan],
                          commit_message=f"Upload doratweet run {Path(run_dir).name}", repo_type="model")
    except LocalTokenNotFoundError:
        raise UserError("push: no Hugging Face token; run `hf auth login` or set HF_TOKEN, then push again") from None
    except HfHubHTTPError as error:
        reason = first_line(error) or type(error).__name__
        raise UserError(f"push --repo {repo_id}: the Hub refused ({reason}); check the token's write access "
                        "and the repo name") from None
    except OSError as error:  # no network, DNS, offline mode
        raise UserError(f"push --repo {repo_id}: cannot reach the Hub ({error}); check the connection and "
                        "that HF_HUB_OFFLINE is not set") from None
    log.info("uploaded %d files to %s", len(plan), url)
    return str(url)
