"""The mixing controller: how the mixture changes while a model trains (docs/design.md §3, Stage C).

One object owns everything between the maths of `mixing.py` and the token stream of `sampler.py`: when an
update is due (every m optimizer steps from the end of warm-up, never at step 0; or at the steps a rule sets
itself, `rule_schedule`), the `train` signal's
per-domain loss sums over the window since the last update (on the device, read once per update), the
rule's update, the sampler's weight schedule (new weights take effect from a later step), and the records
of `mixture.jsonl`. `velocitune train` and the `transformers.Trainer` callback both build it with
`MixingController.from_config` (plan, targets, ℓ_init, rule, warm-up, interval and pacing, each read once)
and drive it, so the two agree on the schedule, the defaults and the records. Its `state_dict()` is plain
JSON and is everything a resumed run needs to continue the same mixture.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from velocitune import dist, mixing, rules, runfiles
from velocitune.config import MixingConfig
from velocitune.errors import ConfigError, TrainingError
from velocitune.online import OnlineTargets, law_record
from velocitune.sampler import MixtureSampler, Plan, cap_weights
from velocitune.schedule import as_steps, first_update_setting, is_update_step, update_interval

# Receives (tag, {domain: value}, step) for TensorBoard-style scalars; the trainer passes its logger's.
ScalarSink = Callable[[str, Mapping[str, float], int], None]
# Builds the run's sampler from the rule's initial weights (k,): the caller owns the stream's geometry.
SamplerFactory = Callable[[np.ndarray], MixtureSampler]


def rule_schedule(rule: mixing.Rule, first: int, steps: int) -> frozenset[int] | None:
    """The update steps of a rule that sets its own (aioli's LearnParams blocks, docs/design.md §3), or None.

    Such a rule has `schedule(first, steps) -> steps`: the optimizer steps (after `first`, the controller's
    warm-up, and before `steps`) at which it needs the signal; each `update` there returns the weights of the
    next block, and its `record_fields()` adds what that block is to the record. Every other rule updates
    every m steps from the warm-up on (`is_update_step`).
    """
    plan = getattr(rule, "schedule", None)
    return None if plan is None else frozenset(plan(int(first), int(steps)))


# ---------------------------------------------------------------------------------- inputs from the config


def read_plan(mc: MixingConfig, names: Sequence[str], budget_tokens: float | None = None) -> dict | None:
    """The plan.json of mixing.plan (checked: the same domains and, given budget_tokens, the same budget), or None."""
    if not mc.plan:
        return None
    doc = runfiles.read_plan(mc.plan, names)
    if budget_tokens is not None and abs(doc["budget_tokens"] - budget_tokens) > 1e-6 * budget_tokens:
        raise ConfigError(
            f"mixing.plan: {mc.plan} was made for a run of {doc['budget_tokens']:.4g} tokens, this run trains "
            f"{budget_tokens:.4g}; its predicted losses hold only at its budget: re-run `velocitune plan` with this config"
        )
    return doc


def initial_weights(mc: MixingConfig, names: Sequence[str], w0: np.ndarray, plan: dict | None) -> np.ndarray:
    """mixing.weights over exactly the prepared domains, else the plan's recommended mixture (`plan`, the
    document of mixing.plan), else w0 (the corpus's token shares). Shape (k,)."""
    if mc.weights is None:
        if plan is not None:
            return np.array([plan["recommended"][n] for n in names], dtype=np.float64)
        return np.asarray(w0, dtype=np.float64).copy()
    unknown = sorted(set(mc.weights) - set(names))
    missing = [n for n in names if n not in mc.weights]
    if unknown or missing:
        raise ConfigError(f"mixing.weights must name exactly the domains {list(names)}; unknown {unknown}, missing {missing}")
    return np.array([mc.weights[n] for n in names], dtype=np.float64)


def read_targets(mc: MixingConfig, names: Sequence[str], plan: dict | None, needed: bool = True) -> np.ndarray | None:
    """Targets from the plan (its predicted losses under its mixture) or else mixing.targets (targets.json),
    then mixing.target_values over either; NaN for domains without one.

    needed: the rule reads targets. A rule that does not (static, uniform, ...) records them when they are
    at hand, but a targets.json that does not exist yet is no reason to refuse it (issue 28).
    """
    values: dict[str, float] = dict(plan["predicted"]) if plan is not None else {}
    if plan is None and mc.targets:
        if Path(mc.targets).exists():
            values.update(runfiles.target_values(runfiles.read_targets(mc.targets)))
        elif needed:
            raise ConfigError(f"mixing.targets: '{mc.targets}' does not exist; run `velocitune targets` first")
    values.update(mc.target_values or {})
    if not values:
        return None
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"targets given for unknown domain(s) {unknown}; the prepared data has {list(names)}")
    return np.array([values.get(n, np.nan) for n in names], dtype=np.float64)


def read_anneal_priors(mc: MixingConfig, names: Sequence[str], plan: dict | None) -> np.ndarray:
    """Each domain's annealing gain C from its `targets` proxy (the CPT law's C where that law made the target,
    else 0), the online laws' prior on C (docs/design.md §3), (k,)."""
    out = np.zeros(len(names))
    if plan is None and mc.targets and Path(mc.targets).exists():
        domains = runfiles.read_targets(mc.targets)["domains"]
        for i, n in enumerate(names):
            d = domains.get(n, {})
            if d.get("predictor") == "cpt_law" and isinstance(d.get("params"), Mapping):
                out[i] = max(0.0, float(d["params"].get("C", 0.0)))
    return out


def read_given_init(mc: MixingConfig, names: Sequence[str], plan: dict | None) -> np.ndarray | None:
    """ℓ_init from the plan (its proxies' step 0), else mixing.init_loss (init_loss.json), or None: the run
    then measures it at step 0."""
    if plan is not None:
        return np.array([plan["init"][n] for n in names], dtype=np.float64)
    if not mc.init_loss:
        return None
    if not Path(mc.init_loss).exists():
        raise ConfigError(
            f"mixing.init_loss: '{mc.init_loss}' does not exist; run `velocitune init-loss` first, or drop the key "
            f"to measure it at step 0"
        )
    found = runfiles.read_init_loss(mc.init_loss, names)
    return np.array([found[n] for n in names], dtype=np.float64)


def make_rule(mc: MixingConfig, w0: np.ndarray, names: Sequence[str], token_counts: np.ndarray) -> mixing.Rule:
    """The config's mixing rule from the registry, starting from `w0`; `token_counts` (k,) feed the temperature
    rule; a rule built from a previous run (replay) gets that run's mixture.jsonl records."""
    src = rules.run_log_input(mc)
    records = runfiles.read_log(src, runfiles.MIXTURE, names) if src is not None else None
    return rules.build_rule(mc, w0, names, token_counts, records)


def check_targets_cover(rule: mixing.Rule, targets: np.ndarray | None, names: Sequence[str]) -> None:
    """A rule that needs targets needs one for every domain."""
    if not rule.needs_targets:
        return
    have = targets if targets is not None else np.full(len(names), np.nan)
    missing = [n for n, t in zip(names, have) if not np.isfinite(t)]
    if missing:
        raise ConfigError(
            f"rule '{rule.name}' needs a target loss for every domain; missing for {missing}. "
            f"Run `velocitune targets` and set mixing.targets=PATH, or give mixing.target_values"
        )


def domain_vector(value: Mapping[str, float] | float | None, names: Sequence[str], key: str,
                  default: float) -> np.ndarray | None:
    """mixing.objective / mixing.max_rise over the domains, (k,): a number for every domain, or {domain: value}
    (unnamed domains get `default`); None stays None."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        return np.full(len(names), float(value))
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ConfigError(f"mixing.{key} names unknown domain(s) {unknown}; the prepared data has {list(names)}")
    return np.array([float(value.get(n, default)) for n in names], dtype=np.float64)


# ------------------------------------------------------------------------------------------------- timing


# --------------------------------------------------------------------------------------------- controller


class MixingController:
    """Owns the mixture of one run: the rule, the sampler's schedule, the train-signal window, the records.

    rule: the mixing rule (its state is the weights w). sampler: the token stream, whose schedule holds
    every w with the step it takes effect. steps/warmup/interval: the run's length, the step of the first
    update and m. signal: "eval" (the caller evaluates the val sets at update points) or "train" (the
    per-domain losses of the training batches since the last update, accumulated here with `observe`).
    targets: ℓ_target, (k,) or None. given_init: ℓ_init from the plan or init_loss.json, (k,), or None (the
    caller measures it). seq_len: tokens per sequence (for tokens per domain). log: the mixture.jsonl writer
    (None on ranks that write no files). scalars: where weights, velocities and targets go as scalars. pace:
    spread every domain's repetition allowance over the rest of the run (mixing.pace; `paced`).
    keep_records: also keep every record in `records` (the Trainer callback saves them with its state).
    online: (w0 (k,), the run's LR per step (T,), its LR warm-up or None until `use_lr_warmup`, the proxy's
    annealing gains C (k,): `read_anneal_priors`) to refit the targets from the run
    (`online.OnlineTargets`, built once ℓ_init is known; `targets` are then its prior). max_rise: (k,) nats over
    each domain's static prediction (needs online). objective: (k,) the user's loss weights, summing to 1.
    Build it with `from_config`; the constructor is for tests and callers that bring their own rule.
    """

    def __init__(self, rule: mixing.Rule, sampler: MixtureSampler, *, steps: int, warmup: int | None, interval: int,
                 signal: str, targets: np.ndarray | None, seq_len: int, device: torch.device,
                 log: runfiles.RunLog | None = None, scalars: ScalarSink | None = None, pace: bool = False,
                 given_init: np.ndarray | None = None, keep_records: bool = False,
                 online: tuple[np.ndarray, np.ndarray, int | None, np.ndarray] | None = None, max_rise: np.ndarray | None = None,
                 objective: np.ndarray | None = None):
        self.rule, self.sampler = rule, sampler
        self.pace = pace
        self.names = list(sampler.names)
        self.steps, self.warmup, self.interval, self.signal = steps, warmup, interval, signal
        self.targets, self.seq_len, self.given_init = targets, seq_len, given_init
        self.adaptive = rules.is_adaptive(rule.name)
        self.log, self.scalars = log, scalars
        self.records: list[dict] | None = [] if keep_records else None
        k = len(self.names)
        self.init: np.ndarray | None = None  # ℓ_init (k,), set by `start`
        # Train-signal window: per-domain NLL sums and token counts on the device, float64 (k,).
        self.sig_sum = torch.zeros(k, dtype=torch.float64, device=device)
        self.sig_cnt = torch.zeros_like(self.sig_sum)
        self.sig_last: np.ndarray | None = None  # the last estimate, kept for a domain absent from a window
        self._logged_w_hat: np.ndarray | None = None  # ŵ of the newest record, to record cap changes
        self._warmup_from_lr = warmup is None  # the first update waits for `use_lr_warmup`
        # The update steps of a rule that sets its own (None: every m steps), known once the warm-up is.
        self._own_steps = None if warmup is None else rule_schedule(rule, warmup, steps)
        self._online_inputs = online
        self.online: OnlineTargets | None = None  # built by `start` / `load_state_dict`, once ℓ_init is known
        self.max_rise, self.objective = max_rise, objective
        self.targets_now = targets  # the targets of the newest update (online: refitted at every update)

    @classmethod
    def from_config(cls, mc: MixingConfig, names: Sequence[str], w0: np.ndarray, token_counts: np.ndarray, *,
                    make_sampler: SamplerFactory, steps: int, lr_warmup: int | None, seq_len: int,
                    device: torch.device, budget_tokens: float | None = None, given_init: np.ndarray | None = None,
                    rule_interval: bool = True, keep_records: bool = False,
                    lrs: np.ndarray | None = None) -> MixingController:
        """The controller of a run from its `mixing` config and its prepared data; the one way to build it.

        names, w0, token_counts: the prepared domains, their token shares and training tokens, (k,).
        make_sampler: builds the sampler from the rule's initial weights. steps: the run's length.
        lr_warmup: the LR warm-up in steps, where the first update falls when neither mixing.warmup nor the
        rule sets it (None: not known yet, give it to `use_lr_warmup` before training). budget_tokens: the run's
        tokens, checked against the plan's. given_init: ℓ_init given by the caller (over the plan's and
        init_loss.json's). rule_interval: use the rule's own interval as the default (see `update_interval`).
        lrs: the run's LR at every step (steps,), which the online targets (mixing.online) need.

        plan.json is read once and gives the initial weights, the targets and ℓ_init; a rule that reads no
        targets does not need targets.json to exist. Everything here is checked before a model is loaded,
        so a refusal is immediate.
        """
        names = list(names)
        plan = read_plan(mc, names, budget_tokens)
        rule = make_rule(mc, initial_weights(mc, names, w0, plan), names, token_counts)
        targets = read_targets(mc, names, plan, needed=rule.needs_targets)
        check_targets_cover(rule, targets, names)
        if given_init is None:
            given_init = read_given_init(mc, names, plan)
        setting = first_update_setting(mc)
        warmup = lr_warmup if setting is None else as_steps(setting, steps)
        online = None
        if mc.online and rules.online_default(mc.rule):  # any other rule ignores the key (config/validation.py)
            if lrs is None:
                raise ConfigError("mixing.online needs the run's LR schedule, which this trainer does not give; "
                                  "set mixing.online=false (the targets then stay as `velocitune targets` made them)")
            online = (np.asarray(w0, dtype=np.float64), np.asarray(lrs, dtype=np.float64), lr_warmup,
                      read_anneal_priors(mc, names, plan))
        objective = domain_vector(mc.objective, names, "objective", 0.0)
        c = cls(rule, make_sampler(rule.initial_weights()), steps=steps, warmup=warmup,
                interval=update_interval(mc, steps, rule_interval), signal=mc.signal, targets=targets,
                seq_len=seq_len, device=device, pace=bool(mc.pace), given_init=given_init, keep_records=keep_records,
                online=online, max_rise=None if online is None else domain_vector(mc.max_rise, names, "max_rise",
                                                                                  rules.DEFAULT_MAX_RISE),
                objective=None if objective is None else objective / objective.sum())
        c._warmup_from_lr = setting is None
        return c

    def use_lr_warmup(self, lr_warmup: int) -> None:
        """The LR warm-up, once the caller knows it (the Trainer callback: at train begin); the first update
        falls there when neither mixing.warmup nor the rule sets it."""
        if self._warmup_from_lr:
            self.warmup = int(lr_warmup)
            self._own_steps = rule_schedule(self.rule, self.warmup, self.steps)
        if self._online_inputs is not None:  # the annealing area starts after the LR warm-up
            w0, lrs, _, anneal = self._online_inputs
            self._online_inputs = (w0, lrs, int(lr_warmup), anneal)

    @property
    def eval_signal(self) -> bool:
        """The rule re-weights from evaluations of the val sets (the caller evaluates at update points)."""
        return self.adaptive and self.signal == "eval"

    # ------------------------------------------------------------------------------------ the schedule

    def due(self, done: int, lag: int = 0) -> bool:
        """Is an update due after `done` optimizer steps, with weights effective `lag` steps later?"""
        if not self.adaptive:
            return False
        if self.warmup is None:
            raise TrainingError("the mixing controller's first update is not known: call use_lr_warmup first")
        if self._own_steps is not None:
            return done > 0 and done in self._own_steps and done + lag < self.steps  # step 0: `start`
        return is_update_step(done, self.warmup, self.interval) and done + lag < self.steps

    def start(self, init: np.ndarray) -> list[str]:
        """Begin a fresh run from ℓ_init: record step 0's weights; return the rule's warnings for the user."""
        self.init = np.asarray(init, dtype=np.float64)
        self.sig_last = self.init.copy()  # train signal: the estimate of a domain not sampled in a window
        self._make_online()
        if self._own_steps is not None and 0 in self._own_steps:
            # The rule's first block starts at step 0 on ℓ_init (aioli's first round): its weights are in force
            # from step 0, and step 0's record is theirs.
            return list(self.update(0, self.init, None).warnings)
        # The forgetting domains' warning says what the online rule does with them (their corpus share), not the guard.
        quiet = (None if self.online is None or self.max_rise is None or not np.isfinite(self.max_rise).any()
                 or self.targets is None else self.targets >= self.init)
        preview = (self.rule.update(0, self.init, self.init, self.targets, guidance=mixing.Guidance(quiet=quiet))
                   if self.rule.needs_init else None)
        warnings = list(preview.warnings) if preview is not None else []
        if self.pace:
            self.sampler.set_weights(0, self.paced(self.rule.initial_weights(), 0))
        w_hat = self.sampler.plan(0).sampling_weights
        self._write(0, 0, None, None, self.rule.initial_weights(), w_hat, [], warnings)
        return warnings

    def plan(self, step: int) -> Plan:
        """The global batch of `step`; records the sampling distribution when a cap changed it (any rule)."""
        plan = self.sampler.plan(step)
        if self._logged_w_hat is None:
            self._logged_w_hat = plan.sampling_weights
        elif not np.array_equal(plan.sampling_weights, self._logged_w_hat):
            # The sampler capped a domain that used its max_repetition epochs (static too): record the
            # distribution actually sampled from this step on, so that plots and the replay rule see it.
            self._write(step, step, None, None, self.weights(), plan.sampling_weights, [], [])
        return plan

    def tokens_per_domain(self, steps: int) -> np.ndarray:
        """Tokens trained per domain in the first `steps` optimizer steps, int64 (k,) (from the plans)."""
        return self.sampler.consumed(steps) * self.seq_len

    def weights(self) -> np.ndarray:
        """The rule's current state weights w (its initial weights for rules without state), (k,)."""
        return np.asarray(self.rule.state_dict().get("weights", self.rule.initial_weights()), dtype=np.float64)

    # ------------------------------------------------------------------------------------- the signal

    def observe(self, nll_sum: torch.Tensor, count: torch.Tensor) -> None:
        """Add per-domain NLL sums and token counts (device, (k,)) to the train-signal window.

        The trainer adds a step's sums once the step is kept: a skipped non-finite step never reaches the
        window, and the earlier steps' sums stay (no host sync: the sums stay on the device).
        """
        self.sig_sum += nll_sum
        self.sig_cnt += count

    def window_losses(self, env: dist.DistEnv) -> tuple[np.ndarray, np.ndarray]:
        """The train signal: token-weighted loss per domain over the window, summed over ranks; then reset.

        Returns (losses float64 (k,), observed bool (k,)). A domain with no tokens in this window
        (observed False) keeps its last estimate.
        """
        k = len(self.names)
        packed = dist.all_reduce_sum(torch.cat([self.sig_sum, self.sig_cnt]), env).cpu().numpy()
        observed = packed[k:] > 0
        losses = np.where(observed, packed[:k] / np.maximum(packed[k:], 1.0), self.sig_last)
        self.sig_last = losses
        self.sig_sum.zero_()
        self.sig_cnt.zero_()
        return losses, observed

    # ------------------------------------------------------------------------------------- the update

    def update(self, done: int, losses: np.ndarray, sampling_weights: np.ndarray | None,
               lag: int = 0, check: Callable[[np.ndarray], None] | None = None,
               observed: np.ndarray | None = None) -> mixing.Update:
        """Apply the rule to `losses` after `done` steps; the new weights take effect at step done + lag.

        sampling_weights: ŵ of the window just trained on. check: called with the new weights before they
        are used (the trainer's cross-rank consistency check). observed: bool (k,), the domains with
        tokens in the window (from `window_losses`; None: all, as for the eval signal).
        """
        guidance, extra = self._guidance(done, losses, observed)
        upd = self.rule.update(done, losses, self.init, self.targets_now, sampling_weights, observed=observed,
                               guidance=guidance)
        if upd.skipped:
            return upd
        if check is not None:
            check(upd.weights)
        w_hat = self.sampler.set_weights(done + lag, self.paced(upd.weights, done + lag))
        self._write(done + lag, done, losses, upd.velocity, upd.weights, w_hat, upd.guarded, upd.warnings, extra)
        return upd

    def _make_online(self) -> None:
        """The online laws, once ℓ_init is known (the targets are their prior)."""
        if self._online_inputs is not None and self.online is None:
            w0, lrs, lr_warmup, anneal = self._online_inputs
            if lr_warmup is None:
                raise TrainingError("the online targets need the LR warm-up: call use_lr_warmup before start")
            self.online = OnlineTargets(self.names, self.init, self.targets, w0, lrs, lr_warmup, anneal=anneal)

    def _guidance(self, done: int, losses: np.ndarray,
                  observed: np.ndarray | None) -> tuple[mixing.Guidance | None, dict[str, Any]]:
        """The targets, floors and forgetting domains of the update after `done` steps (docs/design.md §3).

        Without online targets: the fixed targets and only the objective. With them: the losses join the
        points, every domain's law is refitted, the targets become the mixture-aware predictions at the shares
        in force now, and (with max_rise) the floors keep each domain within max_rise of its static prediction;
        a forgetting domain keeps its corpus share (its floor) and is not upweighted. Returns the guidance
        and the record's extra fields.
        """
        if self.online is None or done == 0:
            return (None if self.objective is None else mixing.Guidance(objective=self.objective)), {}
        schedule = self.sampler.schedule
        # The train signal averages the window since the last update: its point sits mid-window.
        at = done if self.signal == "eval" else max(1, done - self.interval // 2)
        self.online.observe(at, losses, schedule, observed)
        self.targets_now = self.online.targets(done, self.sampler.weights_at(done), schedule)
        static = self.online.static_predictions()
        extra: dict[str, Any] = {"static_prediction": runfiles.per_domain(self.names, static),
                                 "laws": law_record(self.online.laws(), self.names)}
        if self.max_rise is None or not np.isfinite(self.max_rise).any():
            return (None if self.objective is None else mixing.Guidance(objective=self.objective)), extra
        floors = self.online.floors(done, self.max_rise, schedule)
        quiet = self.online.forgetting()
        extra["floors"] = runfiles.per_domain(self.names, floors)
        extra["forgetting"] = [n for n, q in zip(self.names, quiet) if q]
        return mixing.Guidance(objective=self.objective, floors=floors, quiet=quiet), extra

    def paced(self, w: np.ndarray, start: int) -> np.ndarray:
        """The weights the sampler gets from step `start` on: `w`, or with mixing.pace, `w` capped so that
        every domain's repetition allowance lasts to the end of the run.

        cap_d = windows left_d / (steps left · B), the share it can hold every remaining step; when the data
        left cannot fill the remaining steps anyway, the caps are scaled up together (they then sum to 1).
        The excess goes to the other domains in proportion to w (sampler.cap_weights). The rule's own state
        is not changed: mixture.jsonl records it as `weights` and the paced, capped ŵ as `sampling_weights`.
        Shapes (k,).
        """
        if not self.pace or start >= self.steps:
            return w
        left = np.maximum(self.sampler.allowance - self.sampler.consumed(start), 0).astype(np.float64)
        caps = left / float((self.steps - start) * self.sampler.global_batch)
        total = caps.sum()
        if total <= 0:
            return w  # nothing left anywhere: the sampler reports the exhaustion
        return cap_weights(w, caps / min(1.0, total))

    # ------------------------------------------------------------------------------------- the records

    def _write(self, step: int, trained: int, losses, velocity, weights, w_hat, guarded, warnings,
               extra: Mapping[str, Any] | None = None) -> None:
        """One mixture.jsonl record: weights effective from `step`, after `trained` optimizer steps."""
        self._logged_w_hat = w_hat
        if self.log is None and self.records is None:
            return
        named = lambda v: runfiles.per_domain(self.names, v)  # noqa: E731 (a local shorthand)
        record = {"step": step, "tokens": step * self.seq_len * self.sampler.global_batch, "signal": self.signal,
                  "losses": named(losses), "init": named(self.init), "targets": named(self.targets_now),
                  "velocity": named(velocity), "weights": named(weights), "sampling_weights": named(w_hat),
                  "tokens_per_domain": dict(zip(self.names, self.tokens_per_domain(trained).tolist())),
                  "guarded": list(guarded)}
        if self._own_steps is not None and hasattr(self.rule, "record_fields"):
            record.update(self.rule.record_fields())  # which block these weights are (aioli: learn / mix)
        record.update(extra or {})  # online targets: the static predictions, the laws, the floors
        if warnings:
            record["warnings"] = list(warnings)
        if self.records is not None:
            self.records.append(record)
        if self.log is not None:
            self.log.write(record)
        if self.scalars is not None and losses is not None:
            self.scalars("weight", named(w_hat), step)
            if velocity is not None:
                self.scalars("velocity", named(velocity), step)
            if self.targets_now is not None:  # beside the losses in the same charts is where they help
                self.scalars("target", named(self.targets_now), step)

    def resume_log(self, records: Sequence[Mapping[str, Any]]) -> None:
        """After a resume: the newest record's ŵ is what the file says (records of later steps were dropped)."""
        if records:
            self._logged_w_hat = np.array([records[-1]["sampling_weights"][n] for n in self.names], dtype=np.float64)

    # ------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON values only: the window's device sums become lists of floats (float64 -> Python float and
        back through JSON is exact, so a resumed run continues bit-identically)."""
        return {
            "rule": self.rule.state_dict(), "sampler": self.sampler.state_dict(),
            "init": None if self.init is None else self.init.tolist(),
            "sig_last": None if self.sig_last is None else self.sig_last.tolist(),
            "sig_sum": self.sig_sum.cpu().tolist(), "sig_cnt": self.sig_cnt.cpu().tolist(),
            "online": None if self.online is None else self.online.state_dict(),
            "targets_now": None if self.targets_now is None else self.targets_now.tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """A `state_dict()`; the window's sums as lists, or as tensors (checkpoints written before 0.2)."""
        self.rule.load_state_dict(state["rule"])
        self.sampler.load_state_dict(state["sampler"])
        self.init = None if state["init"] is None else np.array(state["init"], dtype=np.float64)
        self.sig_last = None if state["sig_last"] is None else np.array(state["sig_last"], dtype=np.float64)
        for key, window in (("sig_sum", self.sig_sum), ("sig_cnt", self.sig_cnt)):
            saved = torch.as_tensor(state[key], dtype=torch.float64)
            if saved.shape != window.shape:
                raise TrainingError(f"the saved mixing state's {key} has shape {tuple(saved.shape)}, the run has "
                                    f"{len(self.names)} domains: resume with the data the run was started on")
            window.copy_(saved.to(window.device))
        self._make_online()
        if self.online is not None and state.get("online") is not None:
            self.online.load_state_dict(state["online"])
        if state.get("targets_now") is not None:
            self.targets_now = np.array(state["targets_now"], dtype=np.float64)


def check_same_on_all_ranks(w: np.ndarray, env: dist.DistEnv) -> None:
    """Debug (dist.check_weights): every rank must compute bit-identical float64 weights."""
    if not env.distributed:
        return
    import torch.distributed as tdist

    mine = torch.tensor(w, dtype=torch.float64)
    ref = mine.clone()
    tdist.broadcast(ref, src=0)
    if not torch.equal(mine, ref):
        raise TrainingError(f"rank {env.rank} computed weights {w.tolist()} != rank 0's {ref.tolist()}")
