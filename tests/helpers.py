"""Small real checkpoints built by the tests themselves (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny-llama"


def tiny_mlp_state(seed: int = 0, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A two-layer MLP's weights as a trained-looking state dict (fp32)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "net.0.weight": torch.randn(64, 32, generator=g) * scale,
        "net.0.bias": torch.randn(64, generator=g) * scale,
        "norm.weight": torch.ones(64),
        "net.2.weight": torch.randn(16, 64, generator=g) * scale,
        "net.2.bias": torch.zeros(16),
    }


def write_safetensors(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def write_rules(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def load_json(text: str) -> dict:
    return json.loads(text)


def tiny_llama_model(seed: int = 0) -> torch.nn.Module:
    """A 2-layer, 32-wide LlamaForCausalLM (vocab 64) in float32 eval mode, built from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    return LlamaForCausalLM(config).float().eval()
