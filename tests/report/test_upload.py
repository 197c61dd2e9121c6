"""The end-of-run hook that logs one run's plots to W&B (`report.plots.upload_plots`), and the report's place
in the package: it reads run files only, so training can call it without an import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

from report.rundirs import assert_valid_png, fabricate_run

import velocitune
from velocitune.report import upload_plots

PACKAGE = Path(velocitune.__file__).parent


class FakeLogger:
    """Stands in for metrics.WandbLogger: keeps what `images` was given, with a copy of each PNG (W&B copies
    the files when they are logged; the hook deletes its temporary folder afterwards)."""

    def __init__(self):
        self.calls = []

    def images(self, images, step):
        self.calls.append(({tag: (Path(p).read_bytes(), caption) for tag, (p, caption) in images.items()}, step))


def test_upload_plots_logs_each_plot_of_the_run_at_the_last_step(tmp_path):
    run = fabricate_run(tmp_path, "velo-s0", arm="velocitune", rule="velocitune",
                        final={"math": 2.7, "code": 2.45, "prose": 2.6})
    wb = FakeLogger()
    upload_plots(run, wb, step=123)
    [(images, step)] = wb.calls
    assert step == 123
    assert set(images) == {"plots/weights", "plots/val_loss", "plots/velocity", "plots/targets"}
    for tag, (png, caption) in images.items():
        path = tmp_path / f"{tag.split('/')[1]}.png"
        path.write_bytes(png)
        assert_valid_png(path)
        assert caption
    assert "Sampling weights" in images["plots/weights"][1]


def test_upload_plots_warns_instead_of_failing_a_finished_run(tmp_path, capsys):
    wb = FakeLogger()
    upload_plots(tmp_path / "not-a-run", wb, step=5)  # no run files: no plots, and no exception
    assert wb.calls == []
    out = capsys.readouterr().out
    assert "warning: the report's plots were not logged to W&B" in out and "velocitune report" in out


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_report_imports_nothing_of_training_planning_or_targets():
    above = ("velocitune.train", "velocitune.plan", "velocitune.targets", "velocitune.controller")
    for path in sorted((PACKAGE / "report").glob("*.py")):
        bad = sorted(m for m in _imports(path) if m.startswith(above))
        assert not bad, f"{path.name} imports {bad}"


def test_the_trainer_class_imports_no_report():
    tree = ast.parse((PACKAGE / "train.py").read_text(encoding="utf-8"))
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    lazy = [n for n in ast.walk(trainer) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("velocitune.report")]
    assert lazy == []
    top = [n for n in tree.body if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("velocitune.report")]
    assert top == []


def test_laws_import_only_numpy_scipy_and_themselves():
    allowed = ("numpy", "scipy", "velocitune.laws", "velocitune.errors", "__future__", "dataclasses", "math",
               "itertools", "collections", "typing", "functools", "warnings")
    for path in sorted((PACKAGE / "laws").glob("*.py")):
        bad = sorted(m for m in _imports(path) if not m.startswith(allowed))
        assert not bad, f"laws/{path.name} imports {bad}"
