"""python -m hallway_audit"""

from . import interrupt

try:
    from .cli import run
except KeyboardInterrupt as exc:  # Ctrl-C while the CLI imports: one line, exit 130
    raise SystemExit(interrupt.report(exc)) from None

run()
