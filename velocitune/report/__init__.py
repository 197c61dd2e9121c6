"""`velocitune report`: compare finished run directories in one report.md with tables and PNG plots.

`runs` reads and cross-checks the run directories (through `velocitune.runfiles`) and computes the per-run
numbers; `tables` builds the markdown tables; `plots` draws the plots, `targets.png` included (also written
by `velocitune targets`), and `upload_plots` logs one run's plots to W&B (the end-of-run hook of training);
`command` writes report.md (`make_report`, the CLI).

The report reads run files only: it imports nothing of training, planning or targets (no import cycle).
"""

from velocitune.report.command import add_arguments, main, make_report
from velocitune.report.plots import (
    arm_colours,
    domain_colours,
    make_plots,
    plot_online_targets,
    plot_plan,
    plot_targets,
    plot_val_loss,
    plot_velocity,
    plot_weights,
    run_plots,
    targets_figure,
    upload_plots,
)
from velocitune.report.runs import (
    Difference,
    Run,
    RunNumbers,
    Spread,
    difference,
    group_arms,
    load_run,
    load_runs,
    max_rise_limit,
    mean_sd,
    normalised_progress,
    online_target_errors,
    refits_targets,
    reweight_share,
    run_result,
    static_arm,
    weights_move,
)
from velocitune.report.tables import (
    arm_table,
    domain_delta_section,
    domain_delta_table,
    downstream_arm_table,
    downstream_run_table,
    fmt_tokens,
    results_section,
    run_table,
    single_seed_delta_table,
    target_error_section,
    target_error_table,
    targets_section,
    targets_table,
)

__all__ = [
    "Difference", "Run", "RunNumbers", "Spread", "add_arguments", "arm_colours", "arm_table", "difference",
    "domain_colours", "domain_delta_section", "domain_delta_table", "downstream_arm_table", "downstream_run_table",
    "fmt_tokens", "group_arms", "load_run", "load_runs", "main", "make_plots", "make_report", "max_rise_limit",
    "mean_sd", "normalised_progress", "online_target_errors", "plot_online_targets", "plot_plan", "plot_targets",
    "plot_val_loss", "plot_velocity", "plot_weights", "refits_targets", "results_section", "reweight_share",
    "run_plots", "run_result", "run_table", "single_seed_delta_table", "static_arm", "target_error_section",
    "target_error_table", "targets_figure", "targets_section", "targets_table", "upload_plots", "weights_move",
]
