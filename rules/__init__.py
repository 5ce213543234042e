"""Bundled rule files (YAML), shipped as package data; see hallway_audit.rules."""
