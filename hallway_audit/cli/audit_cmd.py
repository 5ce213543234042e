"""`hallway-audit CHECKPOINT`: parse options, call the library, render, exit."""

from __future__ import annotations

import click

from ..audit import FAIL_ON, audit
from ..distributed import ranked_command, worker_rank
from ..plan import DEFAULT_FORMATS, DEFAULT_LR, DEFAULTS, build_plan
from ..report.document import as_document
from ..report.inputs import run_inputs
from ..static.audit import available_cpus
from ..static.parallel import PARALLEL_FROM_ENV, PARALLEL_FROM_MB, SCALED_DIVISOR
from .app import cli
from .outputs import emit, output_options, prepare_outputs
from .progress import run_progress


def _split_list(values: tuple[str, ...]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


# Parameters of audit_command that are plan keys (the rest shape the report), by plan key.
_PLAN_PARAMS = {
    "rules": "rules", "no_rules": "no_rules", "precision": "precision", "lr": "lr", "spectral": "spectral",
    "fail_on": "fail_on", "device": "device", "calib": "calib", "val": "val", "model_spec": "model",
    "loss_spec": "loss", "rank": "rank", "targets": "targets", "alpha": "alpha", "rslora": "rslora",
    "sparsity": "sparsity", "act_precision": "act_precision", "rounding": "rounding",
    "master_weights": "master_weights", "optimizer": "optimizer", "steps": "steps", "samples": "samples",
    "p_every": "p_every", "sigma": "sigma", "micro_batch": "micro_batch", "eval_batch": "eval_batch",
    "seed": "seed", "per_layer_p": "per_layer_p", "no_early_stop": "no_early_stop", "max_length": "max_length",
    "train_steps": "train_steps", "schedule": "schedule", "warmup": "warmup", "lr_min": "lr_min",
    "lora_base": "lora_base", "quantize": "quantize", "adapter_precision": "adapter_precision", "jobs": "jobs",
    "device_map": "device_map", "max_memory": "max_memory",
}
_COMMA_LISTS = ("precision", "lr", "rank", "sparsity", "act_precision", "rounding", "master_weights", "optimizer")


def _explicit(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE


def explicit_flags(ctx: click.Context) -> dict[str, object]:
    """The plan keys the user typed on the command line (a default is not a choice)."""
    flags: dict[str, object] = {}
    for param, key in _PLAN_PARAMS.items():
        if not _explicit(ctx, param):
            continue
        value = ctx.params[param]
        flags[key] = _split_list(value) if key in _COMMA_LISTS else list(value) if key == "rules" else value
    return flags


@cli.command("audit")
@click.argument("checkpoint", metavar="CHECKPOINT")
@click.option("--rules", "rules", multiple=True, metavar="FILE",
              help="Rule file: a bundled name (default.yaml, strict.yaml: always the bundled file) or a path "
                   "(./default.yaml for a local file of that name). Repeat to combine. [default: default.yaml]")
@click.option("--no-rules", is_flag=True, help="Measure only; evaluate no rules (the gate then always passes).")
@click.option("--precision", "precision", multiple=True, metavar="FORMATS",
              help=f"Weight formats, comma-separated (see `hallway-audit formats`). [default: {','.join(DEFAULT_FORMATS)}]")
@click.option("--lr", "lr", multiple=True, metavar="LRS",
              help=f"Learning rates, comma-separated; the static audit uses the first. [default: {DEFAULT_LR:g}]")
@click.option("--spectral", is_flag=True, help="Also compute stable and effective rank of each weight matrix (slower).")
@click.option("--jobs", "jobs", type=int, metavar="N",
              help=f"Processes for the static audit; the report is the same for any N. A CPU audit of safetensors "
                   f"under {PARALLEL_FROM_MB} MB ({PARALLEL_FROM_MB // SCALED_DIVISOR} MB with a scaled format such as "
                   f"int8) runs in one process: a worker takes 2-4 s to start, which smaller checkpoints do not win "
                   f"back (measured by bench/static_jobs.py; {PARALLEL_FROM_ENV} changes it). Other formats and GPU "
                   f"audits run in one process. [default: the CPUs available, {available_cpus()} here]")
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
@click.option("--steps", type=int, default=DEFAULTS["steps"], show_default=True, help="Optimizer steps per burst (1 to 10000).")
@click.option("--samples", type=int, default=DEFAULTS["samples"], show_default=True, help="p_t moves sampled per measured state (1 to 100000).")
@click.option("--p-every", type=int, default=DEFAULTS["p_every"], show_default=True, help="Measure p_t every N steps (0: first and last state).")
@click.option("--sigma", type=float, default=DEFAULTS["sigma"], show_default=True, help="Noise of the optimizer proposal, relative to its signal (>= 0).")
@click.option("--micro-batch", type=int, default=DEFAULTS["micro_batch"], show_default=True, help="Examples per optimizer step.")
@click.option("--eval-batch", type=int, default=DEFAULTS["eval_batch"], show_default=True,
              help="Examples of the fixed batch that judges realized losses, p_t moves and activation cells.")
@click.option("--seed", type=int, default=DEFAULTS["seed"], show_default=True, help="Seed of micro-batches, adapters, masks and p_t samples (0 to 2**63-1).")
@click.option("--per-layer-p", is_flag=True, help="Also measure realized p_t per layer (one sampling run per layer).")
@click.option("--no-early-stop", is_flag=True, help="Always draw --samples moves, even once the interval excludes 1/2.")
@click.option("--max-length", type=int, default=DEFAULTS["max_length"], show_default=True, help="Token limit for text calibration files.")
# --- the planned run the forecast looks ahead to, and how the frameworks run it ----
@click.option("--train-steps", type=int, default=DEFAULTS["train_steps"], show_default=True,
              help="Length of the planned training run: crossings are forecast over it.")
@click.option("--schedule", type=click.Choice(["constant", "cosine", "linear"]), default=DEFAULTS["schedule"],
              show_default=True, help="The run's lr schedule after warmup (decaying to --lr-min).")
@click.option("--warmup", type=int, default=DEFAULTS["warmup"], show_default=True, help="Warmup steps of the planned run.")
@click.option("--lr-min", type=float, default=DEFAULTS["lr_min"], show_default=True, help="The lr the schedule decays to.")
@click.option("--lora-base", type=click.Choice(["frozen", "merged"]), default="frozen", show_default=True,
              help="frozen: LoRA as PEFT/QLoRA run it, Q(W0) + s B A; merged: W0 + s B A rounded onto the format each step.")
@click.option("--quantize", type=click.Choice(["auto", "linear", "all"]), default="auto", show_default=True,
              help="Parameters a weight format applies to: auto = all for bf16/fp16, linear weights for coarser formats.")
@click.option("--adapter-precision", default="fp32", show_default=True, metavar="FORMAT",
              help="Format LoRA adapters are stored in (PEFT: fp32).")
@click.option("--device-map", "device_map", metavar="auto|balanced|FILE",
              help="Spread a Hugging Face model over devices with accelerate, for LoRA settings (a setting that trains "
                   "every parameter must still fit in memory): auto fills GPU 0, 1, ... then the CPU; balanced spreads "
                   "the weights evenly over the GPUs; FILE maps module names to devices (JSON, e.g. "
                   "{\"model.layers.0\": 0, \"lm_head\": \"cpu\", \"model.layers.1\": \"disk\"}). "
                   "Needs hallway-audit[big].")
@click.option("--max-memory", "max_memory", metavar="DEV=SIZE,...",
              help="What --device-map may put on each device, e.g. 0=20GiB,cpu=60GiB; add disk to offload what does "
                   "not fit to a temporary folder (removed afterwards; TMPDIR picks its disk): cpu=8GiB,disk. "
                   "[default: the free memory of each GPU and the CPU; no disk]")
@click.option("--plan", "plan_file", metavar="FILE",
              help="Plan YAML with the keys above (flags given on the command line win; a PEFT config wins over the plan).")
@click.option("--peft-config", metavar="FILE", help="PEFT adapter_config.json: r, target_modules, lora_alpha, use_rslora, rank_pattern.")
@click.option("--trust-plan-code", is_flag=True,
              help="Let --plan's model: and loss: import and run the code they name (module:function, file.py:function).")
@click.pass_context
@ranked_command  # under torchrun: every rank runs it, rank 0 reports (hallway_audit.distributed)
def audit_command(ctx: click.Context, checkpoint, rules, no_rules, precision, lr, spectral, jobs,
                  fail_on, max_rows, device, quiet, calib, val, model_spec, loss_spec, rank, targets, alpha, rslora,
                  sparsity, act_precision, rounding, master_weights, optimizer, steps, samples, p_every, sigma,
                  micro_batch, eval_batch, seed, per_layer_p, no_early_stop, max_length, train_steps, schedule, warmup,
                  lr_min, lora_base, quantize, adapter_precision, plan_file, peft_config, trust_plan_code,
                  device_map, max_memory):
    """Audit CHECKPOINT (.safetensors, sharded index or directory, Hugging Face
    directory, .onnx, .pt/.bin) against the planned formats and rule files; with
    --calib, also run probe bursts of every setting of the sweep."""
    # one merge and one validation for flags, plan YAML and PEFT config (hallway_audit.plan)
    plan = build_plan(explicit_flags(ctx), plan_file, peft_config, trust_code=trust_plan_code)
    rule_files, dynamic = list(plan.rules), plan.dynamic
    # before any expensive work: a bad output fails now (under torchrun rank 0 alone writes, and checks)
    outputs = [] if worker_rank() else prepare_outputs(ctx, run_inputs(
        checkpoint, rules=rule_files, plan=plan_file, peft_config=peft_config,
        calib=dynamic.calib if dynamic else None, val=dynamic.val if dynamic else None,
        model=dynamic.model if dynamic else None, loss=dynamic.loss if dynamic else None))
    with run_progress(quiet=quiet) as (progress, burst_progress):
        result = audit(checkpoint, plan, progress=progress, burst_progress=burst_progress)
    emit(as_document(result), outputs, max_rows=max_rows)
    return result.gate.exit_code
