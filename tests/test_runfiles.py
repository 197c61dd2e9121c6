"""Tests for velocitune.runfiles: every run-file format round-trips through its one writer and reader, and a
truncated, hand-edited or foreign file becomes one clear DataError naming the file and the problem."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from velocitune import runfiles
from velocitune.errors import CheckpointError, DataError
from velocitune.runfiles import RunLock

REPO = Path(__file__).resolve().parents[1]
NAMES = ["prose", "code", "math"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_prepared):
    """A real 8-step run directory (velocitune, eval signal) to read back and to damage."""
    from conftest import tiny_config

    from velocitune.train import train

    out = tmp_path_factory.mktemp("run") / "run"
    train(tiny_config(tiny_prepared, out, train={"steps": 8}, checkpoint={"interval": 0}))
    return out


def _copy(run: Path, tmp: Path) -> Path:
    import shutil

    dst = tmp / "copy"
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("final"))
    return dst


def test_a_finished_run_reads_back_through_every_reader(finished_run):
    summary = runfiles.read_summary(finished_run / runfiles.SUMMARY_FILE)
    assert summary["format"] == "velocitune-summary" and summary["version"] == 1 and summary["complete"]
    assert runfiles.run_is_complete(finished_run)
    for name, fmt in ((runfiles.METRICS_FILE, runfiles.METRICS), (runfiles.EVAL_FILE, runfiles.EVAL),
                      (runfiles.MIXTURE_FILE, runfiles.MIXTURE)):
        records = runfiles.read_log(finished_run / name, fmt, NAMES)
        assert records and all(r["version"] == 1 for r in records)
    init = runfiles.read_init_loss(finished_run / runfiles.INIT_LOSS_FILE, NAMES)
    assert init == summary["init_loss"]
    cfg = runfiles.read_config(finished_run / runfiles.CONFIG_FILE)
    assert cfg.train.steps == 8 and cfg.mixing.rule == "velocitune"
    assert (finished_run / runfiles.CONFIG_FILE).read_text().startswith("version: 1\n")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("final_val_loss"), r"summary\.json: the key 'final_val_loss' is missing"),
    (lambda d: d["final_val_loss"].pop("math"), r"'final_val_loss' has no value for domain\(s\) math"),
    (lambda d: d["final_val_loss"].update(math="low"), r"'final_val_loss' \['math'\] must be a finite number, got 'low'"),
    (lambda d: d.update(steps=-3), r"'steps' must be a whole number >= 0, got -3"),
    (lambda d: d.update(version=7), r"summary format version 7, but this velocitune reads version 1; it was written "
                                    r"by a newer velocitune: upgrade"),
    (lambda d: d.update(format="velocitune-targets"), r"holds a 'velocitune-targets' document, not velocitune-summary"),
])
def test_hand_edited_summary_is_one_clear_error(finished_run, tmp_path, edit, message):
    run = _copy(finished_run, tmp_path)
    path = run / runfiles.SUMMARY_FILE
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=message):
        runfiles.read_summary(path)
    assert not runfiles.run_is_complete(run)


def test_truncated_and_damaged_logs(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    path = run / runfiles.MIXTURE_FILE
    lines = path.read_text().splitlines()
    # A crash-torn last line is dropped (with a warning); the rest reads.
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    with pytest.warns(UserWarning, match="dropped a partial last line"):
        assert len(runfiles.read_log(path, runfiles.MIXTURE, NAMES)) == len(lines) - 1
    # A record edited by hand in the middle names the record and the key.
    rec = json.loads(lines[1])
    rec["sampling_weights"]["code"] = None
    path.write_text("\n".join([lines[0], json.dumps(rec), *lines[2:]]) + "\n")
    with pytest.raises(DataError, match=r"mixture\.jsonl, record 2: 'sampling_weights' \['code'\] must be a finite number"):
        runfiles.read_log(path, runfiles.MIXTURE, NAMES)
    path.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(DataError, match=r"mixture\.jsonl, line 2: not valid JSON"):
        runfiles.read_log(path, runfiles.MIXTURE, NAMES)
    with pytest.raises(DataError, match=r"eval\.jsonl does not exist"):
        runfiles.read_log(run / "nothing" / runfiles.EVAL_FILE, runfiles.EVAL)


def test_metrics_write_null_for_a_domain_without_tokens(tmp_path):
    """null is 'nothing measured'; the reader accepts it for domain_loss, and a writer never writes NaN."""
    log = runfiles.RunLog(tmp_path / runfiles.METRICS_FILE, runfiles.METRICS, ["a", "b"])
    rec = {k: 1.0 for k, f in runfiles.METRICS.fields.items() if f.kind == "number" and not f.optional}
    rec.update(step=1, tokens=8, skipped_steps=0, domain_loss=runfiles.per_domain(["a", "b"], [2.5, np.nan]))
    log.write(rec)
    log.close()
    (back,) = runfiles.read_log(tmp_path / runfiles.METRICS_FILE, runfiles.METRICS, ["a", "b"])
    assert back["domain_loss"] == {"a": 2.5, "b": None}
    bad = runfiles.RunLog(tmp_path / "m2.jsonl", runfiles.METRICS, ["a", "b"])
    with pytest.raises(DataError, match=r"record being written.*'loss' must be a finite number, got nan"):
        bad.write({**rec, "loss": float("nan")})


def test_init_loss_and_targets_round_trip_and_name_what_is_wrong(tmp_path):
    path = tmp_path / "init_loss.json"
    runfiles.write_init_loss(path, "fresh", NAMES, [3.0, 2.5, 4.0], [256, 256, 128], seconds=1.5)
    doc = json.loads(path.read_text())
    assert doc["format"] == "velocitune-init-loss" and doc["version"] == 1 and doc["seconds"] == 1.5
    assert runfiles.read_init_loss(path, NAMES) == {"prose": 3.0, "code": 2.5, "math": 4.0}
    with pytest.raises(DataError, match=r"has no initial loss for domain\(s\) \['law'\]; re-run `velocitune init-loss`"):
        runfiles.read_init_loss(path, NAMES + ["law"])
    doc["domains"]["code"]["loss"] = "2.5"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"domains\['code'\] must hold a finite 'loss' >= 0"):
        runfiles.read_init_loss(path, NAMES)
    path.write_text(json.dumps(doc)[:40])
    with pytest.raises(DataError, match=r"init_loss\.json is not valid JSON"):
        runfiles.read_init_loss(path, NAMES)
    with pytest.raises(DataError, match=r"initial-loss file '.*' is a directory; point at the JSON file"):
        runfiles.read_init_loss(tmp_path, NAMES)

    entry = {"init": 3.0, "points": [[100.0, 2.9], [200.0, 2.8]], "target": 2.5, "predictor": "cpt_law",
             "guarded": False, "warnings": []}
    tpath = tmp_path / "targets.json"
    runfiles.write_targets(tpath, {"predictor": "cpt_law", "domains": {"code": entry}})
    assert runfiles.target_values(runfiles.read_targets(tpath)) == {"code": 2.5}
    hand = json.loads(tpath.read_text())
    hand["domains"]["code"]["target"] = None
    tpath.write_text(json.dumps(hand))
    with pytest.raises(DataError, match=r"targets\.json: domains\['code'\]: 'target' is null.*re-run `velocitune targets`"):
        runfiles.read_targets(tpath)
    # A 0.1 targets.json (no "format" key) still reads: version 1 by default.
    old = {"version": 1, "domains": {"code": entry}}
    tpath.write_text(json.dumps(old))
    assert runfiles.read_targets(tpath)["domains"]["code"]["target"] == 2.5


def test_a_damaged_run_file_is_one_error_line_through_the_cli(finished_run, tmp_path, capsys):
    """A stage that reads another stage's file: `train --mixing.replay_from` on a run whose log was edited."""
    from velocitune.cli import main

    run = _copy(finished_run, tmp_path)
    path = run / runfiles.MIXTURE_FILE
    lines = path.read_text().splitlines()
    rec = json.loads(lines[0])
    del rec["sampling_weights"]
    path.write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text((finished_run / runfiles.CONFIG_FILE).read_text())
    rc = main(["train", str(cfg), f"--run.out_dir={tmp_path / 'replay'}", "--mixing.rule=replay",
               f"--mixing.replay_from={run}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert re.match(r"error: .*mixture\.jsonl, record 1: the key 'sampling_weights' is missing", err)


_HOLDER = """
import sys, time
from velocitune.runfiles import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_lock_refuses_a_second_holder_and_is_released_when_the_holder_dies(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            CheckpointError,
            match=rf"another velocitune process \(pid {holder.pid}\) is using {re.escape(str(tmp_path))}",
        ):
            with RunLock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        holder.stdout.close()
    # The kernel released the dead process's lock: no stale-lock cleanup needed.
    with RunLock(tmp_path) as lock:
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(CheckpointError, match=rf"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()  # a second run in the same process is refused too
        assert lock.path == tmp_path / ".lock"
    with RunLock(tmp_path):  # released on exit
        pass




def test_wandb_run_file_round_trips_and_names_what_is_wrong(tmp_path):
    path = tmp_path / runfiles.WANDB_RUN_FILE
    runfiles.write_wandb_run(path, "3f9c0a1b2c4d", "cpt", None)
    doc = json.loads(path.read_text())
    assert doc == {"format": "velocitune-wandb-run", "version": 1, "run_id": "3f9c0a1b2c4d", "project": "cpt",
                   "entity": None}
    assert runfiles.read_wandb_run(path)["run_id"] == "3f9c0a1b2c4d"
    path.write_text(json.dumps({**doc, "run_id": 42}))
    with pytest.raises(DataError, match=r"wandb\.json: 'run_id' must be a string, got 42.*delete it: the next start"):
        runfiles.read_wandb_run(path)
    path.write_text(json.dumps({**doc, "version": 2}))
    with pytest.raises(DataError, match=r"wandb-run format version 2, but this velocitune reads version 1; it was "
                                        r"written by a newer velocitune"):
        runfiles.read_wandb_run(path)


def test_callback_state_is_versioned_and_reads_the_unversioned_file(tmp_path):
    """The Trainer callback's velocitune_state.json: stamped and checked; a newer version is refused with what
    to do; the unversioned file of velocitune 0.1 still reads, as the same document."""
    import json

    controller = {"rule": {"rule": "static"}, "sampler": {}, "init": [3.0], "sig_last": None,
                  "sig_sum": [0.1], "sig_cnt": [2.0]}
    records = [{"step": 0, "weights": {"a": 1.0}}]
    path = tmp_path / runfiles.CALLBACK_STATE_FILE
    runfiles.write_callback_state(path, controller, records)
    doc = json.loads(path.read_text())
    assert (doc["format"], doc["version"]) == ("velocitune-callback-state", 1)
    got = runfiles.read_callback_state(path)
    assert got["controller"] == controller and got["records"] == records
    path.write_text(json.dumps({**doc, "version": 2}))
    with pytest.raises(DataError, match="callback-state format version 2, but this velocitune reads version 1; it "
                                        "was written by a newer velocitune: upgrade"):
        runfiles.read_callback_state(path)
    path.write_text(json.dumps({**controller, "history": records}))  # velocitune 0.1
    old = runfiles.read_callback_state(path)
    assert old["controller"] == controller and old["records"] == records
    path.write_text(json.dumps({"format": "velocitune-callback-state", "version": 1, "controller": {}}))
    with pytest.raises(DataError, match="the key 'records' is missing"):
        runfiles.read_callback_state(path)
    with pytest.raises(DataError, match="does not exist"):
        runfiles.read_callback_state(tmp_path / "nowhere.json")
