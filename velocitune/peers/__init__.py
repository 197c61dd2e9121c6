"""Newer mixing methods by other authors, each in its own module, run as their authors ran them (docs/design.md §3).

One module per peer: `ado.py` (Adaptive Data Optimization, Jiang et al. 2024) and `aioli.py` (Chen et al. 2024).
"""
