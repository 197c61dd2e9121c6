"""`velocitune plan`: predict any mixture's per-domain loss from a few short runs (docs/design.md §3 Stage P, §4.4).

1. Design (`design`): the corpus mixture w0, uniform, and a tilt toward each domain, (1 - t)·w0 + t·e_i
   (k + 2 runs).
2. Proxies (`proxies`): each mixture is an ordinary `velocitune train` run (the `targets` proxy recipe: a
   stratified subsample, the main schedule compressed) whose length makes all of them together `plan.budget`
   of the main run's steps (`schedule.main_run_steps`, as `velocitune train` counts them). They run here one
   after another, or `--emit` writes their configs and commands for a cluster and `--collect` fits from the
   finished run directories.
3. Stage 1 (`fit`): every domain's loss at the main budget under every mixture m actually trained (the shares
   realised, which differ from the nominal where a domain ran out of data), L_i(r_m): by default
   (`plan.stage1: offset`) the loss at w0 at the main budget (the `targets` prediction) plus how far the
   proxy's end loss sits from the w0 proxy's; or (`extrapolate`) each proxy's own curve fitted with the
   targets predictor and extrapolated, which short proxies do badly (docs/study.md §7).
4. Stage 2 (`fit`): per domain, a mixture law over those points: Ye et al.'s mixing law (transfer between
   domains) or the share law (the D-CPT share term), chosen by leave-one-mixture-out error.
5. Recommendation (`fit`): the mixture minimising the weighted mean of the predicted losses, inside the box of
   shares the proxies covered (no extrapolation beyond what was run), within each domain's repetition
   allowance and each `--max-rise` tolerance over the domain's predicted loss under w0.

`command` holds `make_plan` (the five steps, plan.json and plan.png) and the command line. plan.json holds all
of it; `mixing.plan` in `velocitune train` reads the recommended mixture as the initial weights and the
predicted losses under it as the velocity targets; `laws.plan_predict` evaluates its laws at any mixture.
"""

from velocitune.laws import plan_predict
from velocitune.plan.command import add_arguments, main, make_plan
from velocitune.plan.design import (
    PROXIES_DIR,
    PlanSetup,
    design_mixtures,
    domain_map,
    mixture_dirs,
    needs_curve,
    plan_proxy_config,
    plan_setup,
    proxy_steps,
)
from velocitune.plan.fit import LAWS, allowance_caps, fit_laws, main_budget_losses, plan_document, recommend
from velocitune.plan.proxies import (
    COMMANDS_FILE,
    ProxyResults,
    collect,
    emit_commands,
    proxy_done,
    proxy_result,
    run_proxies,
    unfinished,
)

__all__ = [
    "COMMANDS_FILE", "LAWS", "PROXIES_DIR", "PlanSetup", "ProxyResults", "add_arguments", "allowance_caps",
    "collect", "design_mixtures", "domain_map", "emit_commands", "fit_laws", "main", "main_budget_losses",
    "make_plan", "mixture_dirs", "needs_curve", "plan_document", "plan_predict", "plan_proxy_config",
    "plan_setup", "proxy_done", "proxy_result", "proxy_steps", "recommend", "run_proxies", "unfinished",
]
