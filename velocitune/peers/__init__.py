"""Newer mixing methods by other authors, each in its own module, run as their authors ran them (docs/design.md §3)."""
