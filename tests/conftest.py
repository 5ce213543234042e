"""Shared fixtures. Checkpoint fixtures are named ckpt_* and build tiny real models
in temporary directories (nothing is downloaded)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch


@pytest.fixture
def ckpt_tiny_model() -> torch.nn.Module:
    """A small deterministic MLP with a norm layer (fp32, eval mode)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32),
        torch.nn.ReLU(),
        torch.nn.LayerNorm(32),
        torch.nn.Linear(32, 8),
    )
    return model.eval()


@pytest.fixture
def ckpt_mixed_state() -> dict[str, torch.Tensor]:
    """Tensors in every common stored dtype, with values that survive each dtype exactly."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(24, 16, generator=g)
    return {
        "enc.0.weight": base,
        "enc.0.bias": torch.randn(24, generator=g),
        "enc.1.weight": base.to(torch.bfloat16),
        "enc.2.weight": base.to(torch.float16),
        "enc.3.weight": base.to(torch.float8_e4m3fn),
        "quant.weight": torch.randint(-128, 128, (8, 16), generator=g, dtype=torch.int8),
        "step": torch.tensor([7], dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }


@pytest.fixture(scope="session")
def ckpt_hf_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny Llama saved by transformers as a sharded safetensors HF directory, and its state dict."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path, max_shard_size="50KB")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return path, state
