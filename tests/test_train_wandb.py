"""log.wandb end to end, offline: a tiny run's W&B transaction log is read back record by record and compared with
the run directory (metrics.jsonl, eval.jsonl, mixture.jsonl, summary.json, config.yaml); `--resume` continues the
same W&B run id; only rank 0 starts a W&B run; a missing `wandb` package is a ConfigError before any work.

Nothing here may reach the network: W&B runs offline, its home and cache directories are under tmp_path, and any
Python connection off this machine is refused (the W&B client talks to its own service process locally)."""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import sys
from pathlib import Path

import pytest
import yaml
from conftest import train_interrupted_at

from velocitune import dist, runfiles
from velocitune.config import to_dict
from velocitune.errors import ConfigError
from velocitune.fileio import read_jsonl
from velocitune.report.plots import upload_plots
from velocitune.train import train

pytest.importorskip("wandb")

NAMES = ["prose", "code", "math"]


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline and hermetic: settings, cache and artifacts under tmp_path; connections off-host refused."""
    home = tmp_path / "wandb-home"
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"),
                     ("WANDB_ARTIFACT_DIR", "artifacts")):
        (home / sub).mkdir(parents=True)
        monkeypatch.setenv(var, str(home / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")  # the configs below also say log.wandb_mode=offline
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # were anything to try the server: fail here, fast
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)  # the run directory holds W&B's files (runfiles.WANDB_DIR)
    real_connect = socket.socket.connect

    def local_only(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not ipaddress.ip_address(address[0]).is_loopback:
            raise AssertionError(f"a W&B test tried to connect to {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)


def wandb_config(make_config, name: str, **sections):
    log = {"interval": 4, "progress": False, "wandb": True, "wandb_mode": "offline", "wandb_project": "vt-test",
           "wandb_tags": ["tiny", "ci"], **sections.pop("log", {})}
    return make_config(name, log=log, **sections)


# ------------------------------------------------------------------------------------- reading W&B's files


def _chunks(data: bytes):
    """The records of a W&B transaction log (`run-ID.wandb`): a 7-byte file header (":W&B", magic, version), then
    LevelDB-log blocks of 32 KiB, each record chunk a 7-byte header (crc32, length, type: full/first/middle/last)."""
    assert data[:4] == b":W&B", data[:8]
    block, pos, parts = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            parts = chunk
        elif kind == 3:
            parts += chunk
        elif kind == 4:
            yield parts + chunk


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_wandb_run(path: Path) -> dict:
    """One offline run's transaction log as {run, config, history: {step: {key: value}}, summary, exit_code}."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = {"run": None, "config": {}, "history": {}, "summary": {}, "exit_code": None}
    for raw in _chunks(path.read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = rec.run
            out["config"].update({_key(u): json.loads(u.value_json) for u in rec.run.config.update})
        elif kind == "config":
            out["config"].update({_key(u): json.loads(u.value_json) for u in rec.config.update})
        elif kind == "history":
            row = {_key(i): json.loads(i.value_json) for i in rec.history.item}
            out["history"].setdefault(rec.history.step.num, {}).update(row)
        elif kind == "summary":
            out["summary"].update({_key(u): json.loads(u.value_json) for u in rec.summary.update})
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out


def wandb_runs(run_dir: Path) -> list[tuple[Path, dict]]:
    """Every offline W&B run under the run directory, oldest first (by the run's start time)."""
    files = sorted((run_dir / runfiles.WANDB_DIR).glob("offline-run-*/run-*.wandb"))
    runs = [(f, read_wandb_run(f)) for f in files]
    return sorted(runs, key=lambda r: (r[1]["run"].start_time.seconds, r[1]["run"].start_time.nanos))


def scalar_keys(history: dict) -> set[str]:
    return {k for row in history.values() for k in row if not k.startswith("_") and not k.startswith("plots/")}


# ------------------------------------------------------------------------------------------------- tests


def test_offline_run_logs_what_the_run_directory_holds(make_config, wandb_offline):
    cfg = wandb_config(make_config, "wb", log={"tensorboard": True})
    out = train(cfg, on_end=upload_plots).out_dir  # the hook `velocitune train` passes when W&B logs
    saved = runfiles.read_wandb_run(out / runfiles.WANDB_RUN_FILE)
    [(path, wb)] = wandb_runs(out)
    assert path.name == f"run-{saved['run_id']}.wandb" and wb["run"].run_id == saved["run_id"]
    assert saved["project"] == "vt-test" and saved["entity"] is None
    assert (wb["run"].project, wb["run"].display_name, wb["run"].run_group) == ("vt-test", "wb", "velocitune-eval")
    assert list(wb["run"].tags) == ["tiny", "ci"]
    assert wb["exit_code"] == 0

    # The config: every section as config.yaml has it.
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    for section, body in to_dict(cfg).items():
        assert wb["config"][section] == body == resolved[section], section

    hist = wb["history"]
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [4, 8, 12, 16, 20, 24]
    for r in metrics:
        row = hist[r["step"]]
        assert (row["train/loss"], row["train/lr"], row["train/tok_per_s"]) == (r["loss"], r["lr"], r["tok_per_s"])
        assert {n: row[f"train_domain_loss/{n}"] for n in NAMES} == r["domain_loss"]
    evals = read_jsonl(out / "eval.jsonl")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 24
    for r in evals:
        assert {n: hist[r["step"]][f"val_loss/{n}"] for n in NAMES} == r["losses"]
    updates = [r for r in read_jsonl(out / "mixture.jsonl") if r["losses"] is not None]
    assert len(updates) == 6
    for r in updates:
        row = hist[r["step"]]
        assert {n: row[f"weight/{n}"] for n in NAMES} == r["sampling_weights"]
        assert {n: row[f"velocity/{n}"] for n in NAMES} == r["velocity"]
        assert {n: row[f"target/{n}"] for n in NAMES} == r["targets"]  # online: the update's refitted targets
    # Nothing else was logged at other steps.
    assert set(hist) == {r["step"] for r in metrics} | {r["step"] for r in evals} | {r["step"] for r in updates}

    # The same scalar names as TensorBoard's.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / runfiles.TENSORBOARD_DIR))
    acc.Reload()
    assert scalar_keys(hist) == set(acc.Tags()["scalars"])
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in metrics], rel=1e-6)

    # The summary's final losses, and the report's plots at the last step, their files kept by W&B.
    summary = json.loads((out / "summary.json").read_text())
    for key in ("final_val_loss", "init_loss", "tokens_per_domain"):
        assert {n: wb["summary"][f"{key}/{n}"] for n in NAMES} == summary[key]
    assert wb["summary"]["wall_time_s"] == summary["wall_time_s"]
    plots: dict[str, dict] = {}  # W&B records an image as one history item per field: "plots/weights/path", ...
    for k, v in hist[24].items():
        if k.startswith("plots/"):
            tag, field = k.rsplit("/", 1)
            plots.setdefault(tag, {})[field] = v
    assert set(plots) == {"plots/weights", "plots/val_loss", "plots/velocity", "plots/online_targets"}
    for key, value in plots.items():
        assert value["_type"] == "image-file" and value["format"] == "png" and value["width"] > 100
        png = path.parent / "files" / value["path"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", key
    assert "Sampling weights" in plots["plots/weights"]["caption"]


def test_resume_continues_the_same_wandb_run(make_config, wandb_offline, monkeypatch, capsys):
    sections = dict(log={"interval": 1}, checkpoint={"interval": 8, "keep": 2})
    cfg = wandb_config(make_config, "crash", **sections)
    out = Path(cfg.run.out_dir)
    train_interrupted_at(monkeypatch, cfg, 13)  # after the checkpoint at 8: steps 9..13 were logged, and are re-done on resume
    run_id = runfiles.read_wandb_run(out / runfiles.WANDB_RUN_FILE)["run_id"]
    [(_, first)] = wandb_runs(out)
    assert first["run"].run_id == run_id and first["exit_code"] == 1  # finished as failed, what it had flushed
    assert max(first["history"]) == 13

    capsys.readouterr()
    train(cfg, resume=True)
    assert runfiles.read_wandb_run(out / runfiles.WANDB_RUN_FILE)["run_id"] == run_id
    # The closing line names both offline directories, the interrupted process's first: `wandb sync` uploads all.
    dirs = [p.parent for p, _ in wandb_runs(out)]  # oldest first, by the runs' start times
    assert len(dirs) == 2 and dirs[0] != dirs[1]
    [line] = [x for x in capsys.readouterr().out.splitlines() if "wandb sync" in x]
    assert line == (f"W&B run {run_id} was logged offline in 2 directories; upload them all, oldest first, "
                    f"with: wandb sync {dirs[0]} {dirs[1]}")
    (_, again), (_, second) = wandb_runs(out)
    assert again["history"] == first["history"]  # the first process's file is left as it was
    assert second["run"].run_id == run_id and second["exit_code"] == 0
    # Offline, the resumed process logs into its own directory under the same id, from the step after the
    # checkpoint: the re-done steps 9..13 appear in both, with the same losses (the resume is bit-identical).
    assert min(second["history"]) == 9 and max(second["history"]) == 24
    for step in range(9, 14):
        a, b = first["history"][step], second["history"][step]
        for key in ("train/loss", "train/lr", *(f"train_domain_loss/{n}" for n in NAMES)):
            assert a[key] == b[key], (step, key)
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(1, 25))
    for r in metrics:
        row = (first if r["step"] <= 8 else second)["history"][r["step"]]
        assert row["train/loss"] == r["loss"]
    assert {n: second["summary"][f"final_val_loss/{n}"] for n in NAMES} == \
        json.loads((out / "summary.json").read_text())["final_val_loss"]


def test_only_rank_0_starts_a_wandb_run(make_config, wandb_offline, monkeypatch):
    import wandb

    calls = []
    monkeypatch.setattr(wandb, "init", lambda *a, **k: calls.append(k) or pytest.fail("wandb.init on a rank > 0"))
    # This process plays a rank other than 0 of a one-process "group" (no collective runs with world_size 1).
    monkeypatch.setattr(dist.DistEnv, "is_main", property(lambda self: False))
    cfg = wandb_config(make_config, "rank1", train={"steps": 8}, checkpoint={"interval": 0})
    train(cfg)
    out = Path(cfg.run.out_dir)
    assert calls == []
    assert not (out / runfiles.WANDB_RUN_FILE).exists() and not (out / runfiles.WANDB_DIR).exists()


def test_missing_wandb_package_is_a_config_error_before_any_work(make_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    cfg = wandb_config(make_config, "nowandb")
    with pytest.raises(ConfigError, match=r"pip install 'velocitune\[wandb\]', or set log.wandb=false"):
        train(cfg)
    assert not Path(cfg.run.out_dir).exists()


def test_offline_sync_line_names_every_directory_of_the_run_oldest_first(tmp_path):
    from velocitune.loggers import offline_sync_line

    for name in ("offline-run-20250102_000000-abc", "offline-run-20241231_235959-abc",
                 "offline-run-20250101_120000-other", "run-20250101_000000-abc"):  # another run; an online one
        (tmp_path / name).mkdir()
    assert offline_sync_line(tmp_path, "abc") == (
        f"W&B run abc was logged offline in 2 directories; upload them all, oldest first, with: wandb sync "
        f"{tmp_path}/offline-run-20241231_235959-abc {tmp_path}/offline-run-20250102_000000-abc")
    assert offline_sync_line(tmp_path, "other").endswith(f"upload it with: wandb sync {tmp_path}/offline-run-20250101_120000-other")
