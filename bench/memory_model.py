"""The memory estimate (hallway_audit.memory) against what torch allocates in the same run.

    python bench/memory_model.py [--models tiny,7m,25m] [--settings fp32/full,bf16/full,fp32/r8,bf16/r8]

For each Llama (built from a transformers config, random weights, fixed seed) and setting, one
sweep (2 steps, p_t at 2 states x 8 samples, 12 examples of 32 tokens) runs under
hallway_audit.memory.peak_allocated (torch.profiler's memory events: every CPU allocation and
free), and the peak beyond the loaded weights is printed with the estimate's figure for the
same thing and their ratio peak / estimate, which should stay at or below 1 (an upper bound)
and not far below it. Slow at 25m (about 2 minutes on two cores).
"""

from __future__ import annotations

import argparse
import time

import torch

MODELS = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": (32, 64, 2, 4, 2, 128),
    "7m": (256, 688, 4, 8, 8, 8000),
    "25m": (384, 1024, 8, 6, 2, 16000),
}


def build(name: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    h, i, layers, heads, kv, vocab = MODELS[name]
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=512, use_cache=False)
    return LlamaForCausalLM(config).float().eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,7m,25m")
    ap.add_argument("--settings", default="fp32/full,bf16/full,fp32/r8,bf16/r8")
    args = ap.parse_args()
    torch.set_num_threads(2)

    from hallway_audit.memory import gib, peak_allocated, sweep_memory
    from hallway_audit.model.loaded import LoadedModel
    from hallway_audit.model.losses import resolve_loss
    from hallway_audit.probe import BurstOptions, run_sweep
    from hallway_audit.probe.settings import PrecisionStack, Setting, Subspace

    options = BurstOptions(steps=2, samples=8, micro_batch=4, eval_batch=8)
    print(f"{'model':>6} {'setting':>26} {'peak':>11} {'estimate':>11} {'peak/estimate':>13} {'seconds':>8}")
    for name in args.models.split(","):
        model = build(name)
        vocab = MODELS[name][-1]
        ids = torch.randint(0, vocab, (12, 32), generator=torch.Generator().manual_seed(0))
        train, val = {"input_ids": ids, "labels": ids}, {"input_ids": ids[:4], "labels": ids[:4]}
        loaded = LoadedModel(model, "hf-causal-lm", name, None, ("input_ids", "attention_mask", "labels"))
        loss_name, loss = resolve_loss(None, loaded, train)
        for spec in args.settings.split(","):
            fmt, kind = spec.split("/")
            sub = Subspace() if kind == "full" else Subspace(kind="lora", rank=int(kind.removeprefix("r")))
            setting = Setting(precision=PrecisionStack(weights=fmt), subspace=sub)
            need = sweep_memory(model, [setting], options, train, val).need("cpu")
            start = time.perf_counter()
            peak = peak_allocated(lambda setting=setting, model=model, loss=loss, loss_name=loss_name, train=train,
                                  val=val, name=name: run_sweep(
                model, settings=[setting], loss_fn=loss, loss_name=loss_name, train=train, val=val, options=options,
                model_source=name, calib="random", val_source="random"))
            beyond = need.total - need.weights  # the weights were allocated before the sweep
            print(f"{name:>6} {setting.id:>26} {gib(peak.bytes):>11} {gib(beyond):>11} {peak.bytes / beyond:>13.2f} "
                  f"{time.perf_counter() - start:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
