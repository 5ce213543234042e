"""`hallway-audit CHECKPOINT`: parse options, call the library, render, exit."""

from __future__ import annotations

import sys

import click

from ..audit import DEFAULT_FORMATS, DEFAULT_LR, FAIL_ON, DynamicPlan, audit
from ..errors import UsageError
from ..probe import BurstOptions, SweepSpec, apply_peft_config, from_mapping, load_plan
from ..report.document import as_document
from ..report.inputs import run_inputs
from .app import cli
from .outputs import emit, output_options, prepare_outputs
from .progress import burst_reporter, progress_reporter


def _split_list(values: tuple[str, ...]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


# Options that shape the sweep, as plan keys: a flag given on the command line
# overrides the plan file and the PEFT config.
_SWEEP_FLAGS = ("precision", "act_precision", "rounding", "master_weights", "rank", "targets", "alpha", "rslora",
                "sparsity", "lr", "optimizer")
_BURST_FLAGS = ("steps", "samples", "seed", "p_every", "sigma", "micro_batch", "eval_batch")


def _explicit(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE


def _float_list(values: tuple[str, ...], flag: str) -> list[float]:
    try:
        return [float(v) for v in _split_list(values)]
    except ValueError:
        raise click.BadParameter(f"expected numbers, got {', '.join(values)}", param_hint=flag) from None


@cli.command("audit")
@click.argument("checkpoint", metavar="CHECKPOINT")
@click.option("--rules", "rules", multiple=True, metavar="FILE",
              help="Rule file: a bundled name (default.yaml) or a path. Repeat to combine. [default: default.yaml]")
@click.option("--no-rules", is_flag=True, help="Measure only; evaluate no rules (the gate then always passes).")
@click.option("--precision", "precision", multiple=True, metavar="FORMATS",
              help=f"Weight formats, comma-separated (see `hallway-audit formats`). [default: {','.join(DEFAULT_FORMATS)}]")
@click.option("--lr", "lr", multiple=True, metavar="LRS",
              help=f"Learning rates, comma-separated; the static audit uses the first. [default: {DEFAULT_LR:g}]")
@click.option("--spectral", is_flag=True, help="Also compute stable and effective rank of each weight matrix (slower).")
@output_options
@click.option("--fail-on", type=click.Choice(FAIL_ON), default="error", show_default=True,
              help="Lowest severity that fails the gate (exit 1).")
@click.option("--max-rows", type=click.IntRange(min=0), default=40, show_default=True,
              help="Layers and findings shown by table/markdown; 0 shows all.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda, cuda:N.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
# --- the dynamic audit -----------------------------------------------------------
@click.option("--calib", metavar="FILE", help="Calibration batch (.safetensors/.pt/.npz of named tensors, or .txt/.jsonl text): enables probe bursts.")
@click.option("--val", metavar="FILE", help="Held-out batch. [default: a deterministic 25% split of --calib]")
@click.option("--model", "model_spec", metavar="SPEC", help="Architecture: module:factory or path/to/file.py:factory (default: the Hugging Face directory's).")
@click.option("--loss", "loss_spec", metavar="NAME|SPEC", help="causal_lm, cross_entropy, mse, model_loss, or module:function / file.py:function. [default: chosen from model and batch]")
@click.option("--rank", "rank", multiple=True, metavar="RANKS", help="LoRA ranks, comma-separated; 0 or full = full fine-tuning. [default: full]")
@click.option("--targets", default="all-linear", show_default=True, metavar="TARGETS", help="LoRA/sparsity targets: all-linear, attention, mlp, or a regex over module names.")
@click.option("--alpha", type=float, metavar="ALPHA", help="LoRA alpha. [default: the rank, scale 1]")
@click.option("--rslora", is_flag=True, help="rsLoRA scaling alpha/sqrt(r) instead of alpha/r.")
@click.option("--sparsity", "sparsity", multiple=True, metavar="SPEC", help="FRACTION[:magnitude|random|2:4], comma-separated; 2:4 for N:M.")
@click.option("--act-precision", "act_precision", multiple=True, metavar="FORMATS", help="Activation formats (quantized in the forward; cells for beta_eff). [default: none]")
@click.option("--rounding", "rounding", multiple=True, metavar="MODES", help="nearest, stochastic (comma-separated). [default: nearest]")
@click.option("--master-weights", "master_weights", multiple=True, metavar="KINDS", help="fp32 or none (comma-separated). [default: fp32]")
@click.option("--optimizer", "optimizer", multiple=True, metavar="NAMES", help="adamw, sgd (comma-separated). [default: adamw]")
@click.option("--steps", type=click.IntRange(min=1), default=8, show_default=True, help="Optimizer steps per burst.")
@click.option("--samples", type=click.IntRange(min=1), default=64, show_default=True, help="p_t moves sampled per measured state.")
@click.option("--p-every", type=click.IntRange(min=0), default=0, show_default=True, help="Measure p_t every N steps (0: first and last state).")
@click.option("--sigma", type=click.FloatRange(min=0), default=0.5, show_default=True, help="Noise of the optimizer proposal, relative to its signal.")
@click.option("--micro-batch", type=click.IntRange(min=1), default=8, show_default=True, help="Examples per optimizer step.")
@click.option("--eval-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Examples of the fixed batch that judges realized losses, p_t moves and activation cells.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of micro-batches, adapters, masks and p_t samples.")
@click.option("--per-layer-p", is_flag=True, help="Also measure realized p_t per layer (one sampling run per layer).")
@click.option("--no-early-stop", is_flag=True, help="Always draw --samples moves, even once the interval excludes 1/2.")
@click.option("--max-length", type=click.IntRange(min=1), default=128, show_default=True, help="Token limit for text calibration files.")
@click.option("--plan", "plan_file", metavar="FILE", help="Plan YAML with the keys above (flags given on the command line win).")
@click.option("--peft-config", metavar="FILE", help="PEFT adapter_config.json: r, target_modules, lora_alpha, use_rslora, rank_pattern.")
@click.pass_context
def audit_command(ctx: click.Context, checkpoint, rules, no_rules, precision, lr, spectral,
                  fail_on, max_rows, device, quiet, calib, val, model_spec, loss_spec, rank, targets, alpha, rslora,
                  sparsity, act_precision, rounding, master_weights, optimizer, steps, samples, p_every, sigma,
                  micro_batch, eval_batch, seed, per_layer_p, no_early_stop, max_length, plan_file, peft_config):
    """Audit CHECKPOINT (.safetensors, sharded index or directory, Hugging Face
    directory, .onnx, .pt/.bin) against the planned formats and rule files; with
    --calib, also run probe bursts of every setting of the sweep."""
    plan = load_plan(plan_file) if plan_file else {}
    spec = from_mapping(SweepSpec(precision=list(DEFAULT_FORMATS), lr=[DEFAULT_LR]), plan, plan_file or "plan")
    if peft_config:
        spec = apply_peft_config(spec, peft_config)
    flags = {
        "precision": _split_list(precision),
        "act_precision": _split_list(act_precision),
        "rounding": _split_list(rounding),
        "master_weights": _split_list(master_weights),
        "rank": _split_list(rank),
        "targets": targets,
        "alpha": alpha,
        "rslora": rslora,
        "sparsity": _split_list(sparsity),
        "lr": _float_list(lr, "--lr"),
        "optimizer": _split_list(optimizer),
    }
    spec = from_mapping(spec, {k: v for k, v in flags.items() if _explicit(ctx, k)}, "command line")
    burst_values = {"steps": steps, "samples": samples, "seed": seed, "p_every": p_every, "sigma": sigma,
                    "micro_batch": micro_batch, "eval_batch": eval_batch}
    for key in _BURST_FLAGS:
        if key in plan and not _explicit(ctx, key):
            burst_values[key] = plan[key]
    calib = calib or plan.get("calib")
    dynamic = None
    if calib:
        dynamic = DynamicPlan(
            calib=str(calib),
            model=model_spec or plan.get("model"),
            val=val or plan.get("val"),
            loss=loss_spec or plan.get("loss"),
            sweep=spec,
            burst=BurstOptions(**burst_values, per_layer_p=per_layer_p, early_stop=not no_early_stop),
            max_length=max_length,
        )
    elif model_spec or val or loss_spec:
        raise UsageError("--model, --val and --loss are for the dynamic audit: add --calib FILE")
    if "fail_on" in plan and not _explicit(ctx, "fail_on"):
        fail_on = str(plan["fail_on"])
    if "device" in plan and not _explicit(ctx, "device"):
        device = str(plan["device"])
    plan_rules = plan.get("rules")
    if isinstance(plan_rules, str):
        plan_rules = [plan_rules]
    rule_files = [] if no_rules else (list(rules) or list(plan_rules or []) or ["default.yaml"])
    outputs = prepare_outputs(ctx, run_inputs(  # before any expensive work: a bad output fails now
        checkpoint, rules=rule_files, plan=plan_file, peft_config=peft_config,
        calib=dynamic.calib if dynamic else None, val=dynamic.val if dynamic else None,
        model=dynamic.model if dynamic else None, loss=dynamic.loss if dynamic else None))
    show = not quiet and sys.stderr.isatty()
    with progress_reporter(enabled=show) as progress, burst_reporter(enabled=show) as burst_progress:
        result = audit(
            checkpoint,
            rules=rule_files,
            formats=spec.precision,
            lr=spec.lr[0],
            spectral=spectral,
            fail_on=fail_on,
            device=device,
            progress=progress,
            dynamic=dynamic,
            burst_progress=burst_progress,
        )
    emit(as_document(result), outputs, max_rows=max_rows)
    return result.gate.exit_code
