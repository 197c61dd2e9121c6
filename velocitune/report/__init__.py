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
    mean_sd,
    normalised_progress,
    reweight_share,
    run_result,
    static_arm,
)
from velocitune.report.tables import arm_table, results_section, run_table, targets_table

__all__ = [
    "Difference", "Run", "RunNumbers", "Spread", "add_arguments", "arm_colours", "arm_table", "difference",
    "domain_colours", "group_arms", "load_run", "load_runs", "main", "make_plots", "make_report", "mean_sd",
    "normalised_progress", "plot_plan", "plot_targets", "plot_val_loss", "plot_velocity", "plot_weights", "results_section",
    "reweight_share", "run_plots", "run_result", "run_table", "static_arm", "targets_figure", "targets_table",
    "upload_plots",
]
