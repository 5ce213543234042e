"""The click application: a group whose default command is the audit itself.

`hallway-audit model.safetensors ...` and `hallway-audit audit model.safetensors ...`
are the same; `rules` and `formats` are subcommands.
"""

from __future__ import annotations

import click

from .. import __version__


class DefaultGroup(click.Group):
    """Route anything that is not a subcommand (or --help/--version) to `audit`."""

    default_command = "audit"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="hallway-audit")
def cli() -> None:
    """Audit a checkpoint before a fine-tuning or low-precision training job.

    \b
      hallway-audit CHECKPOINT [OPTIONS]        audit (the default command; --calib for probe bursts)
      hallway-audit rules validate FILE...      check rule files
      hallway-audit rules list [FILE...]        show the rules of bundled or given files
      hallway-audit formats                     the number formats and their lattices
      hallway-audit render REPORT.json          a saved JSON report in another format

    Several GPUs or nodes: run it under torchrun; the settings of the sweep are
    split across the processes (each on cuda:LOCAL_RANK) and rank 0 writes the report:

    \b
      torchrun --nproc-per-node 8 -m hallway_audit CHECKPOINT --calib FILE --rank 8,16,32 --precision bf16,fp8_e4m3

    Exit codes: 0 gate passed, 1 gate failed, 2 usage error, 3 unreadable
    checkpoint, 4 invalid rule file, 5 report not written, 6 out of memory,
    7 model cannot be built or does not fit the checkpoint, 8 calibration data or
    loss unusable, 9 torchrun ranks could not meet or one stopped responding,
    70 internal error.
    """


from . import audit_cmd, formats_cmd, render_cmd, rules_cmd  # noqa: E402,F401  (register subcommands)
