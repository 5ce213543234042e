"""python -m hallway_audit"""

from .cli import run

run()
