"""hallway-audit: pre-flight diagnostics for fine-tuning and low-precision training."""

__version__ = "0.1.0"
