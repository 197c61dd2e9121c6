"""Stages A and B of docs/design.md §3: the base model's initial loss, and target losses from a proxy run.

`init-loss` evaluates the base model on the fixed val sets. `targets` runs the same training loop on a
stratified subsample (fraction p) with static w0, the main run's batch size and peak LR and its LR schedule
compressed to the proxy's length, evaluates at n points over [0.1, 1] of the proxy, fits a law per domain
and extrapolates to the main run's budget. The maths lives in `velocitune.laws`; the recipe in the config's
`targets` section. One job per module:

- `init_loss`: `velocitune init-loss` and where init_loss.json goes (`init_loss_main`, `init_loss_path`);
- `proxy`: the proxy recipe (`proxy_config`, `proxy_eval_steps`), the main run's length it is sized from
  (`main_steps_for`) and whether a finished proxy can be reused (`proxy_reusable`);
- `fit`: one domain's fit and extrapolation (`fit_domain`) and its drawn curves (`law_curves`);
- `command`: `velocitune targets` (`estimate_targets`, `targets_main`, `targets_path`).
"""

from velocitune.targets.command import estimate_targets, targets_main, targets_path
from velocitune.targets.fit import CURVE_POINTS, fit_domain, law_curves
from velocitune.targets.init_loss import init_loss_main, init_loss_path
from velocitune.targets.proxy import main_steps_for, proxy_config, proxy_eval_steps, proxy_reusable

__all__ = [
    "CURVE_POINTS", "estimate_targets", "fit_domain", "init_loss_main", "init_loss_path", "law_curves",
    "main_steps_for", "proxy_config", "proxy_eval_steps", "proxy_reusable", "targets_main", "targets_path",
]
