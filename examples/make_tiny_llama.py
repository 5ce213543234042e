"""Regenerate the bundled example: a tiny Llama trained on a copy task.

    python examples/make_tiny_llama.py            # writes examples/tiny-llama/

Builds the architecture with transformers from a local config (nothing is
downloaded), trains it for a few seconds on CPU with a fixed seed on a generated
task (copy a random 8-token string after a separator), and writes a Hugging Face
directory (config.json + model.safetensors) plus a calibration batch
calib.safetensors (input_ids, attention_mask, labels) for the dynamic audit. The
calibration batch is the *fine-tuning* task — reverse the string instead of
copying it — so its gradients are those of a job that still has work to do.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB, SPAN, SEP = 32, 8, 1  # tokens 2..31 are content, 1 separates, 0 pads


def copy_task(n: int, generator: torch.Generator, reverse: bool = False) -> torch.Tensor:
    """n sequences [x_1..x_8, SEP, x_1..x_8] (or the string reversed after SEP)."""
    content = torch.randint(2, VOCAB, (n, SPAN), generator=generator)
    sep = torch.full((n, 1), SEP)
    answer = content.flip(1) if reverse else content
    return torch.cat([content, sep, answer], dim=1)


def build(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def train(model: LlamaForCausalLM, steps: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    losses = []
    model.train()
    for _ in range(steps):
        ids = copy_task(64, gen)
        labels = ids.clone()
        labels[:, : SPAN + 1] = -100  # only the copy is scored
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "tiny-llama")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    model = build(args.seed)
    losses = train(model, args.steps, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = copy_task(32, gen, reverse=True)
    labels = ids.clone()
    labels[:, : SPAN + 1] = -100
    save_file(
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels},
        str(args.out / "calib.safetensors"),
        metadata={"task": "reverse 8 tokens after a separator", "seed": str(args.seed + 1)},
    )
    n = sum(p.numel() for p in model.parameters())
    print(f"{n} params, loss {losses[0]:.3f} -> {losses[-1]:.3f} in {args.steps} steps, "
          f"{time.perf_counter() - start:.1f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
