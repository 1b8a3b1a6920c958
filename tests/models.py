"""Tiny seeded models built from configs in code: real transformers classes, no downloads."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# Large enough that one row of logits (VOCAB * 4 bytes) is not a "small value".
VOCAB = 2000


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=64,
        vocab_size=VOCAB,
        n_positions=256,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )
    return GPT2LMHeadModel(config).eval()


def _decoder(config_cls: type, model_cls: type, seed: int, **extra: object) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = config_cls(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )
    model: PreTrainedModel = model_cls(config).eval()
    return model


def tiny_llama(seed: int = 0) -> PreTrainedModel:
    return _decoder(LlamaConfig, LlamaForCausalLM, seed, num_key_value_heads=2)


def slow_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """Slow enough per token (4 layers, 256 wide, 2,048 positions) that a long generate is
    surely still running when a test kills its server."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=VOCAB, n_positions=2048)
    return GPT2LMHeadModel(config).eval()


def tiny_qwen2(seed: int = 0) -> PreTrainedModel:
    return _decoder(Qwen2Config, Qwen2ForCausalLM, seed, num_key_value_heads=2)


def tiny_mistral(seed: int = 0) -> PreTrainedModel:
    return _decoder(
        MistralConfig, MistralForCausalLM, seed, num_key_value_heads=2, sliding_window=64
    )


def tiny_neox(seed: int = 0) -> PreTrainedModel:
    return _decoder(GPTNeoXConfig, GPTNeoXForCausalLM, seed)


BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
# The five families the transformers parity matrix runs against.
FAMILIES = {
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
    "mistral": tiny_mistral,
    "gpt_neox": tiny_neox,
}


def prompt(batch: int = 1, length: int = 12, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB - 1, (batch, length), generator=generator)
