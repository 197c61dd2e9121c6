"""The maths of the newer peers of Velocitune, each as its authors ran it (pure numpy/scipy, no torch, no I/O).

One module per peer: `ado` (Adaptive Data Optimization, Jiang et al. 2024). Each builds a `mixing.Rule` and is
declared once in velocitune/rules.py; the differences from the authors' code are listed in the README's rule
table and docs/design.md §3.
"""

from velocitune.peers.ado import ADORule, fit_laws, make_ado

__all__ = ["ADORule", "fit_laws", "make_ado"]
