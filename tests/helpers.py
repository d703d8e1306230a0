"""Helpers the tests share (fixtures stay in conftest.py)."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch


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
