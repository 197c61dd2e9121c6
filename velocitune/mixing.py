"""The mixing rules: given per-domain losses, decide the next domain weights (pure numpy, no I/O).

Everything here is float64 and renormalised after every operation (docs/design.md §3). Warnings are
returned as data (`Update.warnings`), never logged, so the trainer decides where they go.

Errors, decided once for the whole module:
- bad values a user can fix (weights, rule parameters, initial/target losses) -> ConfigError;
- a non-finite or negative training-time loss -> TrainingError naming the domain;
- arrays of the wrong length or shape, a negative step, a non-finite `signal` given to update_weights,
  `sampling_weights` that are not a distribution -> ValueError (a caller's bug, not the user's).
Losses are cross-entropies in nats, so they must be finite and >= 0; that bound is also what keeps
every rule free of NaN for any input it accepts.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from velocitune.errors import CheckpointError, ConfigError, DataError, TrainingError

__all__ = [  # the public maths API (docs/design.md §5)
    "velocity", "update_weights", "normalize", "make_rule", "check_param", "replay_weights_from_records",
    "lift_to_floors", "Guidance", "Rule", "Update", "RULE_PARAMS", "PARAM_BOUNDS", "PRESETS",
]

# Parameters each rule accepts, with their defaults (config keys: keep the names).
_VELOCITY_PARAMS: dict[str, Any] = {"preset": "faithful", "eta": 1.0, "smoothing": 0.0, "floor": 0.02,
                                    "relative_floor": 0.0, "min_weight": 0.0, "ema": 0.0}
RULE_PARAMS: dict[str, dict[str, Any]] = {
    "static": {},
    "uniform": {},
    "temperature": {"temperature": 2.0, "token_counts": None},
    "velocitune": dict(_VELOCITY_PARAMS),
    "velocitune-no-target": dict(_VELOCITY_PARAMS),
    "dbl": {"eta": 1.0, "smoothing": 1e-4},
    "odm": {"alpha": 0.9},  # the authors' default smoothing factor (their 1B ablations also ran 0.5)
    "replay": {"replay_weights": None},
}
# Presets of the velocity rules; explicit parameters override them.
PRESETS: dict[str, dict[str, float]] = {
    "faithful": {"smoothing": 0.0, "floor": 0.02},  # the paper's rule plus the guard
    # Issue 9's update study (docs/study.md): of smoothing, η, a relative floor, an EMA on V, the
    # interval and a minimum weight, only smoothing moved the mean loss beyond noise (c = 0.2: −0.095
    # nats against faithful on the demo); a relative floor starved the guarded replay domain and the
    # EMA slowed the reaction to forgetting, so both stay off.
    "robust": {"smoothing": 0.2, "floor": 0.02},
}
# Bounds of each rule parameter (lo, hi, lo_open, hi_open; "1/k": one over the number of domains), written once:
# make_rule checks them, and the registry (velocitune/rules.py) shows and checks them for config values.
PARAM_BOUNDS: dict[str, tuple[float, float | str, bool, bool]] = {
    "eta": (0.0, math.inf, False, False), "smoothing": (0.0, 1.0, False, False),
    "floor": (0.0, math.inf, True, False),  # δ_min guards a division by the gap: > 0
    "relative_floor": (0.0, math.inf, False, False), "min_weight": (0.0, "1/k", False, False),
    "ema": (0.0, 1.0, False, True), "alpha": (0.0, 1.0, False, True), "temperature": (0.0, math.inf, True, False),
}
# ODM's reward exp(l) overflows for absurd losses (l > 709 nats); capping keeps the policy defined.
_REWARD_CAP = np.finfo(np.float64).max / 4


# --------------------------------------------------------------------------------------------
# Validation helpers


def _vector(x: ArrayLike, what: str, k: int | None = None) -> np.ndarray:
    """`x` as a fresh 1-D float64 array, of length k when given (ValueError otherwise)."""
    if np.ndim(x) > 1:
        raise ValueError(f"{what} must be a 1-D array, got shape {np.shape(x)}")
    a = np.array(x, dtype=np.float64).reshape(-1)
    if k is not None and a.size != k:
        raise ValueError(f"{what} has {a.size} entries but there are {k} domains")
    return a


def _label(names: Sequence[str] | None, i: int) -> str:
    return repr(names[i]) if names is not None else f"#{i}"


def _check_weights(
    w: ArrayLike, what: str = "weights", k: int | None = None, error: type[Exception] = ConfigError
) -> np.ndarray:
    a = _vector(w, what, k)
    if a.size == 0:
        raise ValueError(f"{what} is empty: there must be at least one domain")
    if not np.all(np.isfinite(a)) or np.any(a < 0) or a.max() <= 0:
        raise error(f"{what} must be finite and non-negative with a positive sum, got {a.tolist()}")
    return a


def _check_losses(
    x: ArrayLike,
    what: str,
    k: int | None,
    names: Sequence[str] | None,
    error: type[Exception],
    hint: str,
) -> np.ndarray:
    """Losses must be finite and >= 0 (cross-entropy, nats); `error` names the first bad domain."""
    a = _vector(x, what, k)
    bad = np.flatnonzero(~np.isfinite(a) | (a < 0))
    if bad.size:
        i = int(bad[0])
        raise error(f"{what} of domain {_label(names, i)} is {a[i]} (must be finite and >= 0); {hint}")
    return a


def _param(where: str, key: str, value: Any, lo: float, hi: float, lo_open=False, hi_open=False) -> float:
    """A finite numeric parameter in [lo, hi] (open ends where asked), else ConfigError naming it."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"mixing.{key} ({where}) must be a number, got {value!r}") from None
    ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi) and math.isfinite(v)
    if not ok:
        lb, hb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ConfigError(f"mixing.{key} ({where}) must be in {lb}{lo:g}, {hi:g}{hb}, got {value!r}")
    return v


def _by_name(value: Mapping[str, float] | ArrayLike, names: Sequence[str], what: str) -> np.ndarray:
    """A per-domain value given as {name: x} or as a sequence in domain order."""
    if isinstance(value, Mapping):
        missing = [n for n in names if n not in value]
        unknown = [n for n in value if n not in names]
        if missing or unknown:
            raise ConfigError(
                f"{what} must have exactly the domains {list(names)}: "
                f"missing {missing}, unknown {unknown}"
            )
        value = [value[n] for n in names]
    try:
        return _vector(value, what, len(names))
    except ValueError as e:
        raise ConfigError(str(e)) from None


# --------------------------------------------------------------------------------------------
# The maths


def normalize(w: ArrayLike) -> np.ndarray:
    """`w / sum(w)` in float64; ConfigError unless w is finite, non-negative, with a positive sum."""
    a = _check_weights(w)
    a = a / a.max()  # so that the sum of huge finite weights cannot overflow to inf
    return a / a.sum()


def _denominator(init: np.ndarray, target: np.ndarray, floor: float, relative_floor: float) -> np.ndarray:
    """den[i] = max(l_init - l_target, floor, relative_floor * median |gaps|), shape (k,)."""
    gaps = init - target
    return np.maximum(gaps, max(floor, relative_floor * float(np.median(np.abs(gaps)))))


def velocity(
    loss_now: ArrayLike,
    loss_init: ArrayLike,
    loss_target: ArrayLike,
    floor: float = 0.02,
    *,
    relative_floor: float = 0.0,
) -> np.ndarray:
    """V = clip((l_now - l_target) / den, 0, 1), den = max(l_init - l_target, floor, rel·median|gap|).

    V = 1: no progress from the initial loss yet; V = 0: at or below the target. The floor (δ_min)
    is the guard for domains with l_init <= l_target (docs/design.md §3); `relative_floor` scales with the
    median gap so that a tiny gap cannot make V a hair trigger (docs/design.md §8). Shapes: (k,) -> (k,).
    """
    init = _check_losses(loss_init, "loss_init", None, None, ConfigError, "check the initial losses")
    k = init.size
    now = _check_losses(loss_now, "loss_now", k, None, TrainingError, "training produced a bad loss")
    target = _check_losses(loss_target, "loss_target", k, None, ConfigError, "check the targets")
    floor = _param("velocity()", "floor", floor, 0.0, math.inf, lo_open=True)
    relative_floor = _param("velocity()", "relative_floor", relative_floor, 0.0, math.inf)
    den = _denominator(init, target, floor, relative_floor)
    # den >= floor > 0 and finite; the quotient may overflow to +inf, which the clip maps to 1.
    with np.errstate(over="ignore"):
        return np.clip((now - target) / den, 0.0, 1.0)


def update_weights(
    weights: ArrayLike, signal: ArrayLike, eta: float = 1.0, smoothing: float = 0.0
) -> np.ndarray:
    """w <- normalize(w · exp(eta·signal)); then w <- (1 - c)·w + c/k with c = `smoothing`.

    Computed in log space, shifted by the largest signal among domains with w > 0, so that neither
    exp overflowing nor w·exp underflowing to all zeros can produce NaN. A zero weight stays zero
    until smoothing lifts it. Shapes: (k,), (k,) -> (k,).
    """
    w = normalize(weights)
    s = _vector(signal, "signal", w.size)
    if not np.all(np.isfinite(s)):
        raise ValueError(f"signal must be finite, got {s.tolist()}")
    eta = _param("update_weights()", "eta", eta, 0.0, math.inf)
    c = _param("update_weights()", "smoothing", smoothing, 0.0, 1.0)
    live = w > 0
    logits = np.full(w.size, -np.inf)
    with np.errstate(over="ignore"):
        # shifted <= 0 on live domains (may be -inf for absurd spreads: exp then gives 0, not NaN).
        shifted = s[live] - s[live].max()
        logits[live] = np.log(w[live]) + (eta * shifted if eta > 0 else 0.0)
    w = np.exp(logits - logits.max())
    w /= w.sum()
    return normalize((1.0 - c) * w + c / w.size)


def _lift_to_min_weight(w: np.ndarray, min_weight: float) -> np.ndarray:
    """Mix w with uniform by the smallest λ that makes every w_i >= min_weight (<= 1/k)."""
    low = w < min_weight
    if not low.any():
        return w
    k = w.size
    # (1-λ)·w_i + λ/k >= m  <=>  λ >= (m - w_i) / (1/k - w_i), for each w_i < m <= 1/k.
    lam = min(1.0, float(np.max((min_weight - w[low]) / (1.0 / k - w[low]))))
    return normalize((1.0 - lam) * w + lam / k)


def lift_to_floors(w: ArrayLike, floors: ArrayLike, pinned: ArrayLike | None = None) -> tuple[np.ndarray, bool]:
    """w with every w_i >= floors_i, the others scaled together; (weights (k,), feasible).

    Water-filling: a domain below its floor is set to it, the rest share what is left in proportion to w,
    until no domain is below its floor. `pinned` (bool (k,)): domains held at exactly their floor, above it
    or not (the forgetting domains, docs/design.md §3). When the floors sum to more than 1 they are scaled to
    sum to 1 (feasible False: no mixture keeps every floor; the caller warns). Shapes (k,).
    """
    w = normalize(w)
    f = _vector(floors, "floors", w.size)
    if not np.all(np.isfinite(f)) or np.any(f < 0):
        raise ValueError(f"floors must be finite and >= 0, got {f.tolist()}")
    feasible = f.sum() <= 1.0 + 1e-12
    if not feasible:
        return normalize(f), False
    fixed = w < f  # at their floor; the others share what is left in proportion to w
    if pinned is not None:
        fixed |= np.asarray(pinned, dtype=bool)
    out = np.where(fixed, f, w)
    for _ in range(w.size):
        free = ~fixed
        mass = w[free].sum()
        if mass <= 0:  # every domain with weight is at its floor: the floors alone, renormalised
            return normalize(np.where(fixed, f, 0.0)), True
        out = np.where(fixed, f, w * (1.0 - f[fixed].sum()) / mass)
        newly = free & (out < f)
        if not newly.any():
            break
        fixed |= newly
    return normalize(out), True


@dataclass(frozen=True)
class Guidance:
    """What the controller's online laws and the user's objective add to a velocity update (docs/design.md §3).

    objective: (k,) weights of the loss the user wants lowered, summing to 1 (mixing.objective); the signal is
    k·o_i·V_i, so the default (1/k each, the mean loss) leaves V as it is. floors: (k,) the least share each
    domain keeps after the update (mixing.max_rise; `online.OnlineTargets.floors`). quiet: bool (k,), the
    forgetting domains: their V is 0 and they get exactly their floor, no more (docs/design.md §3).
    """

    objective: np.ndarray | None = None
    floors: np.ndarray | None = None
    quiet: np.ndarray | None = None


def _odm_explore_rate(k: int, t: int) -> float:
    """EXP3 exploration rate ε_t = min(1/k, sqrt(ln k / (k·t))), t >= 1 (optimizer steps done)."""
    return min(1.0 / k, math.sqrt(math.log(k) / (k * t)))


# --------------------------------------------------------------------------------------------
# Rules


@dataclass
class Update:
    """What one call of `Rule.update` decided.

    weights: the rule's new state w, shape (k,). velocity: the per-domain signal the rule used
    (velocity V for the velocitune rules, the excess l - l_ref for dbl, the reward estimate R for odm;
    None for fixed rules). guarded: domains whose velocity denominator was floored because
    l_init <= l_target. skipped: True at step 0, where nothing is updated. warnings: messages for
    the user, each given once per run.
    """

    weights: np.ndarray
    velocity: np.ndarray | None = None
    guarded: list[str] = field(default_factory=list)
    skipped: bool = False
    warnings: list[str] = field(default_factory=list)


class Rule:
    """A mixing rule with fixed weights (static, uniform, temperature, replay); adaptive rules subclass it.

    Call `update` every m steps with the per-domain losses; its `Update.weights` is the new state w
    (the trainer derives the sampling distribution ŵ from it). `state_dict()` holds everything
    needed to resume bit-identically.
    """

    needs_targets = False
    needs_init = False
    guidance: Guidance = Guidance()  # the newest update's (`update`)

    def __init__(self, name: str, weights: np.ndarray, names: Sequence[str]):
        self.name = name
        self.names = list(names)
        self._initial = normalize(weights)
        self._w = self._initial.copy()
        self._updates = 0  # updates applied (step > 0)

    def initial_weights(self) -> np.ndarray:
        """The weights in force from step 0, shape (k,)."""
        return self._initial.copy()

    def update(
        self,
        step: int,
        losses: ArrayLike,
        init: ArrayLike | None,
        targets: ArrayLike | None,
        sampling_weights: ArrayLike | None = None,
        observed: ArrayLike | None = None,
        guidance: Guidance | None = None,
    ) -> Update:
        """Validate the inputs and, unless step == 0, advance the rule by one update.

        step: optimizer steps done. sampling_weights: ŵ of the window just trained on, (k,).
        observed: bool (k,), which domains had tokens in the window (default: all); a domain that had
        none carries its last estimate in `losses`, and rules that track only played arms (odm) skip it.
        guidance: the objective, floors and forgetting domains of this update (`Guidance`); the velocity
        rules follow it, the baselines (which run as their authors ran them) take none.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        k = len(self.names)
        losses = _check_losses(
            losses, "the loss", k, self.names, TrainingError,
            "training diverged or the domain had no tokens in the window; lower the learning rate "
            "or check the data, then resume from the last checkpoint",
        )
        init = self._required(
            init, "initial loss", self.needs_init, "the initial loss (run `velocitune init-loss`)"
        )
        targets = self._required(
            targets, "target loss", self.needs_targets, "target losses (run `velocitune targets`)"
        )
        if sampling_weights is not None:
            sw = _check_weights(sampling_weights, "sampling_weights", k, error=ValueError)
            sampling_weights = sw / sw.sum()
        seen = np.ones(k, dtype=bool) if observed is None else np.asarray(observed, dtype=bool)
        if seen.shape != (k,):
            raise ValueError(f"observed must be a bool array of shape ({k},), got shape {seen.shape}")
        self.guidance = guidance if guidance is not None else Guidance()
        if step == 0:
            # docs/design.md §3: nothing has been trained at t = 0 (V ≡ 1 would change nothing).
            return self._preview(losses, init, targets)
        update = self._step(losses, init, targets, sampling_weights, step=step, observed=seen)
        self._w = update.weights
        self._updates += 1
        return update

    def _required(self, values: ArrayLike | None, what: str, needed: bool, desc: str) -> np.ndarray | None:
        if values is None:
            if needed:
                raise ConfigError(
                    f"rule {self.name!r} needs {desc}, but none were given; provide them, or pick a "
                    "rule that does not (odm, static, uniform, temperature; velocitune-no-target "
                    "needs only initial losses)"
                )
            return None
        k = len(self.names)
        return _check_losses(values, f"the {what}", k, self.names, ConfigError, f"check {desc}")

    def _preview(self, losses, init, targets) -> Update:
        return Update(self._w.copy(), skipped=True)

    def _step(self, losses, init, targets, sampling_weights, *, step, observed) -> Update:
        return Update(self._w.copy())

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values (JSON-safe; floats round-trip exactly)."""
        return {
            "rule": self.name,
            "names": list(self.names),
            "weights": self._w.tolist(),
            "updates": self._updates,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("rule") != self.name or list(state.get("names", [])) != self.names:
            raise CheckpointError(
                f"the checkpoint's mixing state is for rule {state.get('rule')!r} over domains "
                f"{state.get('names')}, but this run uses rule {self.name!r} over {self.names}; "
                "resume with the run's original config"
            )
        self._w = _check_weights(state["weights"], "checkpoint weights", len(self.names))
        self._updates = int(state["updates"])


class VelocityRule(Rule):
    """Velocitune Stage C: w <- normalize(w·exp(η·V)), smoothing, optional min weight and EMA of V."""

    needs_init = True

    def __init__(
        self, name, weights, names, *, no_target: bool, eta, smoothing, floor, relative_floor, min_weight, ema
    ):
        super().__init__(name, weights, names)
        self.no_target = no_target
        self.needs_targets = not no_target
        self.eta, self.smoothing, self.floor = eta, smoothing, floor
        self.relative_floor, self.min_weight, self.ema = relative_floor, min_weight, ema
        self._v_ema: np.ndarray | None = None  # EMA of V over applied updates, shape (k,)
        self._warned: set[str] = set()  # guarded domains already warned about

    def _velocity(self, losses, init, targets) -> tuple[np.ndarray, list[str], list[str]]:
        if self.no_target:
            targets = np.zeros_like(losses)  # ℓ_target := 0 (ablation)
        v = velocity(losses, init, targets, self.floor, relative_floor=self.relative_floor)
        den = _denominator(init, targets, self.floor, self.relative_floor)
        quiet = self.guidance.quiet
        if quiet is not None:
            # Forgetting domains (docs/design.md §3): V = 0, their floor (their corpus share) gives them data.
            v = np.where(quiet, 0.0, v)
        guarded = [n for n, g in zip(self.names, init <= targets) if g]
        warnings = []
        for n in guarded:
            if n in self._warned:
                continue
            i = self.names.index(n)
            if quiet is not None and quiet[i]:
                warnings.append(
                    f"domain {n!r}: predicted to get worse (target {targets[i]:.4f} >= initial loss {init[i]:.4f}); "
                    "it keeps its corpus share (static's data) and is not upweighted by its velocity")
            else:
                warnings.append(
                    f"domain {n!r}: initial loss {init[i]:.4f} <= target {targets[i]:.4f} (predicted to "
                    f"degrade); its velocity uses the floor {den[i]:.4g} nats, so it is upweighted while "
                    "above its target. Check targets.json if this is unexpected."
                )
            self._warned.add(n)
        return v, guarded, warnings

    def _preview(self, losses, init, targets) -> Update:
        v, guarded, warnings = self._velocity(losses, init, targets)
        return Update(self._w.copy(), v, guarded, skipped=True, warnings=warnings)

    def _step(self, losses, init, targets, sampling_weights, *, step, observed) -> Update:
        v, guarded, warnings = self._velocity(losses, init, targets)
        if self.ema > 0 and self._v_ema is not None:
            v = self.ema * self._v_ema + (1.0 - self.ema) * v
        self._v_ema = v
        g = self.guidance
        # The user's objective o (sums to 1): the signal k·o_i·V_i; o = 1/k (the mean loss) leaves V as it is.
        signal = v if g.objective is None else len(v) * g.objective * v
        w = update_weights(self._w, signal, self.eta, self.smoothing)
        w = _lift_to_min_weight(w, self.min_weight)
        if g.floors is not None:
            # A forgetting domain keeps exactly its floor (its corpus share): smoothing toward uniform must not
            # lift a 5 % replay slice either (docs/design.md §3).
            w, feasible = lift_to_floors(w, g.floors, pinned=g.quiet)
            if not feasible and "<max_rise>" not in self._warned:
                self._warned.add("<max_rise>")
                warnings.append(
                    f"no mixture keeps every domain within mixing.max_rise of its static prediction (floors sum to "
                    f"{float(np.sum(g.floors)):.3f}); the floors are scaled down together. Raise mixing.max_rise")
        return Update(w, v.copy(), guarded, warnings=warnings)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "v_ema": None if self._v_ema is None else self._v_ema.tolist(),
            "warned": sorted(self._warned),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._v_ema = None if state["v_ema"] is None else np.array(state["v_ema"], dtype=np.float64)
        self._warned = set(state["warned"])


class DBLRule(Rule):
    """Sheared-LLaMA's dynamic batch loading, as its authors ran it.

    princeton-nlp/LLM-Shearing @ b87218b, DynamicLoadingCallback.update_proportion (update_type
    "doremi"), called after every evaluation: w <- softmax(log w + η·(ℓ - ℓ_ref)), then
    w <- (1 - c)·w + c/k with η = 1, c = 1e-4. The excess is not clipped at 0 (the paper's Algorithm 1
    clips it): a domain below its reference loss loses weight. ℓ_ref = the run's targets.
    """

    needs_targets = True

    def __init__(self, name, weights, names, *, eta, smoothing):
        super().__init__(name, weights, names)
        self.eta, self.smoothing = eta, smoothing

    def _step(self, losses, init, targets, sampling_weights, *, step, observed) -> Update:
        excess = losses - targets  # shape (k,); negative below the reference
        return Update(update_weights(self._w, excess, self.eta, self.smoothing), excess)


class ODMRule(Rule):
    """Online Data Mixing (Albalak et al. 2023), as its authors ran it.

    alon-albalak/online-data-mixing @ edbfdad, SmoothedMeanWeightUpdater.group_update (the class their
    README names as the paper's implementation; their 1B/3B runs use it with mixed mini-batches), run
    after every optimizer step past a warm-up on the per-domain training loss of that step:
      R_i <- α·R_i + (1-α)·exp(ℓ_i)   for every domain with tokens in the window (others keep R_i);
      ε_t = min(1/k, sqrt(ln k / (k·t))), t = optimizer steps done;
      p_i = (1 - k·ε_t)·R_i / Σ_j R_j + ε_t.
    The policy is linear in R (their group update dropped the softmax of the per-arm update), the reward
    carries no importance weight 1/p_i, R starts at 0 and the weights start at w0 (their runs start
    from the natural mixture). Shapes: (k,).
    """

    def __init__(self, name, weights, names, *, alpha):
        super().__init__(name, weights, names)
        self.alpha = alpha
        self._reward = np.zeros(len(names))  # R, shape (k,)

    def _step(self, losses, init, targets, sampling_weights, *, step, observed) -> Update:
        with np.errstate(over="ignore"):
            gain = np.minimum(np.exp(losses), _REWARD_CAP)  # exp(ℓ); ℓ > 709 nats would overflow
        reward = np.where(observed, self.alpha * self._reward + (1.0 - self.alpha) * gain, self._reward)
        self._reward = np.minimum(reward, _REWARD_CAP)
        top = self._reward.max()
        if top <= 0:  # nothing observed yet: no evidence, keep the weights
            return Update(self._w.copy(), self._reward.copy())
        share = self._reward / top  # R / ΣR computed as (R/max) / Σ(R/max): no overflow, shape (k,)
        share /= share.sum()
        eps = _odm_explore_rate(len(self.names), step)
        return Update(normalize((1.0 - len(self.names) * eps) * share + eps), self._reward.copy())

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "reward": self._reward.tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._reward = np.array(state["reward"], dtype=np.float64)


def check_param(rule: str, key: str, value: Any, k: int | None = None) -> float:
    """`value` as a float in PARAM_BOUNDS[key], else ConfigError naming it; k: domains (None skips 1/k bounds)."""
    lo, hi, lo_open, hi_open = PARAM_BOUNDS[key]
    if hi == "1/k":
        hi = 1.0 / k if k is not None else math.inf
    return _param(f"rule {rule!r}", key, value, lo, float(hi), lo_open=lo_open, hi_open=hi_open)


def _resolve_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults < preset < explicit params (None = not given); unknown keys are ConfigErrors."""
    allowed = RULE_PARAMS[name]
    for key in params:
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"rule {name!r} has no parameter {key!r}{hint} (valid: {sorted(allowed) or 'none'})"
            )
    given = {k: v for k, v in params.items() if v is not None}
    resolved = dict(allowed)
    if "preset" in allowed:
        preset = given.get("preset", allowed["preset"])
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r} for rule {name!r}; choose one of {sorted(PRESETS)}")
        resolved.update(PRESETS[preset])
    resolved.update(given)
    return resolved


# One constructor per rule: (name, w0 (k,), names, resolved params) -> Rule; a new rule adds its own.
def _temperature(name, w0, names, p) -> Rule:
    tau = check_param(name, "temperature", p["temperature"])
    counts = w0 if p["token_counts"] is None else _by_name(p["token_counts"], names, "token_counts")
    return Rule(name, _check_weights(counts, "token_counts") ** (1.0 / tau), names)  # w ∝ n_i^(1/τ)


def _replay(name, w0, names, p) -> Rule:
    if p["replay_weights"] is None:
        raise ConfigError(
            "rule 'replay' needs replay_weights (from replay_weights_from_records on a previous "
            "run's mixture.jsonl); set mixing.replay_from to that run directory"
        )
    return Rule(name, normalize(_by_name(p["replay_weights"], names, "replay_weights")), names)


def _checked(name: str, p: Mapping[str, Any], k: int, *keys: str) -> dict[str, float]:
    return {key: check_param(name, key, p[key], k) for key in keys}


_VELOCITY_KEYS = ("eta", "smoothing", "floor", "relative_floor", "min_weight", "ema")
_CONSTRUCTORS: dict[str, Any] = {
    "static": lambda name, w0, names, p: Rule(name, w0, names),
    "uniform": lambda name, w0, names, p: Rule(name, np.ones(len(names)), names),
    "temperature": _temperature,
    "velocitune": lambda name, w0, names, p: VelocityRule(
        name, w0, names, no_target=False, **_checked(name, p, len(names), *_VELOCITY_KEYS)),
    "velocitune-no-target": lambda name, w0, names, p: VelocityRule(
        name, w0, names, no_target=True, **_checked(name, p, len(names), *_VELOCITY_KEYS)),
    "dbl": lambda name, w0, names, p: DBLRule(name, w0, names, **_checked(name, p, len(names), "eta", "smoothing")),
    "odm": lambda name, w0, names, p: ODMRule(name, w0, names, **_checked(name, p, len(names), "alpha")),
    "replay": _replay,
}


def make_rule(name: str, w0: Mapping[str, float] | ArrayLike, names: Sequence[str], **params: Any) -> Rule:
    """Build the rule `name` over domains `names` (in order), starting from `w0` where it applies.

    Parameters are those of RULE_PARAMS[name]; None means "use the default". The `temperature`
    rule takes `token_counts` (default: w0, which is the prepared corpus's token shares).
    """
    if name not in RULE_PARAMS:
        close = difflib.get_close_matches(name, list(RULE_PARAMS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown mixing rule {name!r}{hint} (valid: {list(RULE_PARAMS)})")
    if len(set(names)) != len(names) or not names:
        raise ConfigError(f"domain names must be non-empty and distinct, got {list(names)}")
    w0 = normalize(_by_name(w0, names, "w0"))
    return _CONSTRUCTORS[name](name, w0, list(names), _resolve_params(name, params))


def replay_weights_from_records(
    records: Sequence[Mapping[str, Any]],
    names: Sequence[str],
    mode: str = "average",
    total_tokens: float | None = None,
) -> np.ndarray:
    """Weights for the `replay` rule from a previous run's parsed mixture.jsonl records.

    "final": the last record's `sampling_weights`. "average": their token-weighted time average,
    each record's weights held from its `tokens` to the next record's, the last one up to
    `total_tokens` (default: the last record's tokens, so it then counts for nothing). When no
    tokens elapsed at all (a single record), the average is that record's weights. Shape (k,).
    """
    if mode not in ("average", "final"):
        raise ConfigError(f"replay mode must be 'average' or 'final', got {mode!r}")
    if not records:
        raise DataError("mixture.jsonl has no records: the previous run logged no weights to replay")
    weights, tokens = [], []
    for j, rec in enumerate(records):
        sw = rec.get("sampling_weights")
        if not isinstance(sw, Mapping) or any(n not in sw for n in names) or "tokens" not in rec:
            raise DataError(
                f"mixture.jsonl record {j} (0-based) lacks 'tokens' or 'sampling_weights' for domains "
                f"{list(names)}; was the run made with the same domains?"
            )
        weights.append([sw[n] for n in names])
        tokens.append(float(rec["tokens"]))
    w = np.array(weights, dtype=np.float64)  # (records, k)
    if mode == "final":
        return normalize(w[-1])
    end = tokens[-1] if total_tokens is None else float(total_tokens)
    edges = np.array(tokens + [end])
    held = np.diff(edges)  # tokens each record's weights were in force, shape (records,)
    if np.any(held < 0):
        j = int(np.flatnonzero(held < 0)[0])
        raise DataError(
            f"mixture.jsonl tokens decrease at record {j + 1} ({edges[j + 1]} after {edges[j]}), "
            "or total_tokens is below the last record's tokens; the file is corrupted or from two runs"
        )
    if held.sum() == 0:
        return normalize(w[-1])
    return normalize(held @ w)
