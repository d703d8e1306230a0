"""Helpers the tests share: tiny models and tweets built offline, float64 comparisons (fixtures stay in conftest.py)."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch


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



@contextmanager
def norms_in_the_models_dtype():
    """transformers' LLaMA and Mistral RMSNorm compute in float32 whatever the model's dtype; inside this block
    they compute in the dtype they are given, so that a float64 model rounds to float32 nowhere."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    with ExitStack() as stack:
        for norm in (LlamaRMSNorm, MistralRMSNorm):
            stack.callback(setattr, norm, "forward", norm.forward)
            norm.forward = forward
        yield


@contextmanager
def models_in_float64():
    """Every model doratweet loads inside this block comes in float64, and its adapters with it, and nothing in
    the forward or backward pass rounds to float32 (see `norms_in_the_models_dtype`).

    Two computations that add the same numbers in another order (ranks' all-reduce against one process, other
    batch shapes, other CPU kernels or thread counts) differ by ~1e-7 relative in float32 and by ~1e-16 in
    float64. Comparing them in float64 leaves a tight tolerance with a meaning on any CPU: what differs beyond it
    is the logic under test, not the rounding.
    """
    import doratweet.models as models

    load_folder = models._load_folder

    def load_in_float64(folder, dtype, *args, **kwargs):
        return load_folder(folder, torch.float64, *args, **kwargs)

    models._load_folder = load_in_float64
    try:
        with norms_in_the_models_dtype():
            yield
    finally:
        models._load_folder = load_folder


def write_tiny_llama_gguf(path, seed: int = 0):
    """A tiny random LLaMA (2 layers, hidden 64) as an f32 GGUF file with the embedded SmolLM2's tokenizer and chat
    template, copied from its GGUF: a GGUF base model that loads in seconds, for the export tests."""
    import gguf
    from transformers import AutoModelForCausalLM, LlamaConfig

    from doratweet.export import gguf_tensors
    from doratweet.models import embedded_gguf_path

    source = gguf.GGUFReader(embedded_gguf_path())
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, initializer_range=0.2)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    writer = gguf.GGUFWriter(path, "llama")
    for key, field in source.fields.items():
        if key.startswith(("GGUF.", "llama.", "general.architecture", "general.file_type", "general.quantization")):
            continue
        sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, array in gguf_tensors(model).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
