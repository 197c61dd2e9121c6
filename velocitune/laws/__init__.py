"""Scaling-law fits that turn short runs into predicted losses (docs/design.md §3 Stage B and §4).

Pure numpy/scipy in float64: no I/O, no printing, no torch. One job per module:

- `data_law`: the data law `L(D) = E + B/D^β` (`fit_data_law`, `check_data_law`), the full
  Chinchilla law `L(N, D) = E + A/N^α + B/D^β` (`fit_chinchilla`) and the last-resort fallback
  `loglinear_extrapolate`;
- `cpt_law`: the LR areas of a schedule (`lr_areas`) and the LR-schedule-aware CPT law
  (`fit_cpt_law`, `check_cpt_law`, `cpt_full_law`; §4.2);
- `mixture_law`: the D-CPT law over the domain share r (`fit_dcpt_law`, `suggest_domain_share`;
  §4.3) and Ye et al.'s data mixing law over the whole mixture (`fit_mixing_law`) and the
  share law over a domain's own share (`fit_share_law`), both at a fixed budget, and a plan's
  prediction from the law each domain chose (`plan_predict`; §4.4);
- `solver`: the robust-fitting engine they share (Huber loss, Levenberg–Marquardt descent,
  L-BFGS-B polish, residual bootstrap); its docstring explains how every fit is made.

Every public name is re-exported here: `from velocitune import laws; laws.fit_data_law(...)`.
"""

from velocitune.laws.cpt_law import CptLawFit, check_cpt_law, cpt_full_law, fit_cpt_law, lr_areas
from velocitune.laws.data_law import (
    ChinchillaFit,
    DataLawFit,
    check_data_law,
    fit_chinchilla,
    fit_data_law,
    loglinear_extrapolate,
)
from velocitune.laws.mixture_law import (
    DcptFit,
    MixingLawFit,
    ShareLawFit,
    fit_dcpt_law,
    fit_mixing_law,
    fit_share_law,
    plan_predict,
    suggest_domain_share,
)

__all__ = [
    "ChinchillaFit",
    "CptLawFit",
    "DataLawFit",
    "DcptFit",
    "MixingLawFit",
    "ShareLawFit",
    "check_cpt_law",
    "check_data_law",
    "cpt_full_law",
    "fit_chinchilla",
    "fit_cpt_law",
    "fit_data_law",
    "fit_dcpt_law",
    "fit_mixing_law",
    "fit_share_law",
    "loglinear_extrapolate",
    "lr_areas",
    "plan_predict",
    "suggest_domain_share",
]
