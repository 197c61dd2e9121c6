"""The `odm`, `dbl` and `aioli` rules against our own transcriptions of their authors' updates.

Each reference below is a transcription, written for this test, of the update function in the authors'
public code, kept in their structure (per-name dicts and Python floats for ODM, torch float32 for DBL) so
that it shares no code with velocitune.mixing:

- ODM: alon-albalak/online-data-mixing, commit edbfdadb62b0388120b6198b1743067a7cd990dc,
  megatron/data/data_sampling_utils.py, SmoothedMeanWeightUpdater.group_update (the class the README
  names as the paper's implementation; scripts/train_1B_ema*.sh run it with mixed mini-batches, so
  megatron/training.py calls group_update after every step with the mean loss of each domain present in
  the batch), behind DynamicDataSamplingWeight's UpdateScheduler (update when iteration > warmup).
- DBL: princeton-nlp/LLM-Shearing, commit b87218b566c73f6b246aaad3e4c42883f65a48a6,
  llmshearing/callbacks/dynamic_loading_callback.py, DynamicLoadingCallback.update_proportion with
  update_type "doremi", called from eval_end with the evaluation losses.
- Aioli: HazyResearch/aioli, commit 910d5249ec55c0e1ea1a25b9a7588640306f31cf, trainer/aioli_trainer.py,
  AioliTrainer.train (no prior, no graph) and learn_params_subroutine, driven by a synthetic loss model; ours
  runs through the MixingController (its rule-set update steps), the sampler and the rule.

Remaining differences, documented in the README's rule table and docs/design.md §3: we compute in
float64 (their DBL runs in float32: one update of theirs agrees to float32 precision, a whole
trajectory of theirs computed in float64 agrees to 1e-11); the train signal of a window longer than
one step averages its steps (ODM runs with m = 1, where it is the step's loss, as theirs).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from velocitune.mixing import make_rule
from velocitune.rules import timing as rule_timing

ODM_COMMIT = "alon-albalak/online-data-mixing@edbfdadb62b0388120b6198b1743067a7cd990dc"
DBL_COMMIT = "princeton-nlp/LLM-Shearing@b87218b566c73f6b246aaad3e4c42883f65a48a6"


class AuthorsODM:
    """Transcription of SmoothedMeanWeightUpdater (group_update path) with its update scheduler."""

    def __init__(self, names, weights, smoothing_factor, warmup_steps, update_frequency=1):
        self.names = list(names)
        self.k = len(names)
        self.weights = list(weights)
        total = sum(weights)
        self.probabilities = {n: w / total for n, w in zip(names, weights)}
        self.estimated_reward = {n: 0.0 for n in names}
        self.eps = 1 / self.k
        self.prev_eps = None
        self.alpha = smoothing_factor
        self.warmup_steps, self.update_frequency = warmup_steps, update_frequency

    def step(self, iteration, batch_losses):
        """After optimizer step `iteration` (1-based), with {domain: mean loss} of the domains in the batch."""
        if not (iteration > self.warmup_steps and iteration % self.update_frequency == 0):
            return list(self.probabilities.values())
        self.prev_eps = self.eps
        self.eps = min(1 / self.k, math.sqrt(math.log(self.k) / (self.k * iteration)))
        for name, loss in batch_losses.items():
            self.estimated_reward[name] = self.alpha * self.estimated_reward[name] + (1 - self.alpha) * math.exp(loss)
        total = sum(r * self.prev_eps for r in self.estimated_reward.values())
        scale = (1 - self.k * self.eps) / total
        for i, name in enumerate(self.names):
            self.weights[i] = self.estimated_reward[name] * self.prev_eps * scale + self.eps
        total_w = sum(self.weights)
        for i, name in enumerate(self.names):
            self.probabilities[name] = self.weights[i] / total_w
        return list(self.probabilities.values())


def authors_dbl(current_prop, losses, target_loss, dtype=torch.float32):
    """Transcription of DynamicLoadingCallback.update_proportion, update_type 'doremi'.

    Theirs runs in torch's default float32; `dtype` lets the test follow a whole trajectory in float64.
    """
    diff = torch.tensor(losses, dtype=dtype) - torch.tensor(target_loss, dtype=dtype)
    eta, c = 1.0, 1e-4
    alpha = torch.softmax(torch.log(torch.tensor(current_prop, dtype=dtype)) + eta * diff, dim=0)
    new = ((1 - c) * alpha + c / len(current_prop)).numpy().astype("float64")
    return (new / new.sum()).tolist()


def _domains(seed: int, k_max: int):
    """A seeded generator, 2..k_max domain names and a random starting mixture over them."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, k_max + 1))
    return rng, [f"d{i}" for i in range(k)], rng.dirichlet(np.ones(k))


@pytest.mark.parametrize("seed", range(4))
def test_odm_matches_the_authors_update(seed):
    """Per-step losses of a random subset of domains, through both; the weights agree at every step."""
    rng, names, w0 = _domains(seed, k_max=6)
    k = len(names)
    steps = 300
    warmup = int(round(rule_timing("odm")["warmup"] * steps))  # our default: 2 %, their 2000 of 100k
    ref = AuthorsODM(names, w0.tolist(), smoothing_factor=0.9, warmup_steps=warmup)
    ours = make_rule("odm", w0, names)
    base = rng.uniform(1.0, 4.0, k)
    last = base.copy()
    for it in range(1, steps + 1):
        seen = rng.random(k) < 0.7  # a domain may be absent from a step's batch
        losses = base * (1 - 0.3 * it / steps) + rng.normal(0, 0.05, k)
        want = ref.step(it, {n: float(v) for n, v, s in zip(names, losses, seen) if s})
        if it > warmup:  # our controller calls the rule only when an update is due
            last = np.where(seen, losses, last)  # the carried estimate of an unobserved domain
            got = ours.update(it, last, None, None, observed=seen).weights
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15, err_msg=f"{ODM_COMMIT}, step {it}")
        else:
            np.testing.assert_allclose(ours.initial_weights(), want, rtol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_dbl_matches_the_authors_update(seed):
    """Evaluation losses above and below the reference, through both, over 40 updates."""
    rng, names, w0 = _domains(seed, k_max=7)
    k = len(names)
    target = rng.uniform(1.0, 3.0, k)
    ours = make_rule("dbl", w0, names)
    prop = w0.tolist()
    for t in range(1, 41):
        losses = target + rng.normal(0.05, 0.2, k)  # some domains below their reference
        # One update of theirs in float32 from the same state: equal to float32 precision.
        single = authors_dbl(prop, losses.tolist(), target.tolist())
        prop = authors_dbl(prop, losses.tolist(), target.tolist(), dtype=torch.float64)
        got = ours.update(t, losses, None, target).weights
        np.testing.assert_allclose(got, single, rtol=1e-5, atol=1e-7, err_msg=f"{DBL_COMMIT}, update {t}")
        np.testing.assert_allclose(got, prop, rtol=1e-11, atol=1e-15, err_msg=f"{DBL_COMMIT} (float64), update {t}")


def test_default_timing_is_the_authors():
    """ODM: every step, training loss, after 2 % of the run; DBL: at every evaluation from the start."""
    assert rule_timing("odm") == {"signal": "train", "interval": 1, "warmup": 0.02}
    assert rule_timing("dbl")["signal"] == "eval" and rule_timing("dbl")["warmup"] == 0.0


# ----------------------------------------------------------------------------------------------------- aioli

AIOLI_COMMIT = "HazyResearch/aioli@910d5249ec55c0e1ea1a25b9a7588640306f31cf"


class LossModel:
    """A synthetic run: tokens per domain T (k,) grow by B·p per step at mixture p; the val loss is
    ℓ = ℓ0 - A_true·(1 - exp(-T/S)), so training on domain j lowers every domain i by A_true[i, j]·(gain)."""

    def __init__(self, rng, k, batch):
        self.a_true = rng.uniform(0.0, 0.1, (k, k)) + np.diag(rng.uniform(0.2, 0.5, k))
        self.l0, self.scale, self.batch = rng.uniform(2.0, 4.0, k), rng.uniform(200.0, 600.0, k), batch
        self.tokens = np.zeros(k)

    def train(self, p, steps):
        for _ in range(steps):
            self.tokens = self.tokens + self.batch * np.asarray(p)

    def evaluate(self):
        return self.l0 - self.a_true @ (1.0 - np.exp(-self.tokens / self.scale))


def authors_aioli(sim, *, k, eta, ema, f, lp_rounds, lp_steps, update_steps, normalize, diagonal, total_steps,
                  batch, seed):
    """Transcription of AioliTrainer.train (no aioli_prior, no graph_path) and learn_params_subroutine: the learned
    weights (normalised) of each round. The one substitution: the sweep order's np.random.permutation (global
    state) draws from default_rng([seed, round]), the generator our rule uses, so that both see the same blocks."""

    def learn_params_subroutine(loss_0, i):
        previous_loss = loss_0.copy()
        new_graph = np.zeros((k, k))
        rng = np.random.default_rng([seed, i])
        mixture_order = np.concatenate([rng.permutation(k) for _ in range(lp_rounds)])
        for onehot_idx in mixture_order:
            weights = np.ones(k) * (1 - f) / (k - 1)
            weights[onehot_idx] = f
            sim.train(weights / weights.sum(), lp_steps)
            new_loss = sim.evaluate()
            new_graph[:, onehot_idx] += previous_loss - new_loss
            previous_loss = new_loss
        new_graph /= lp_rounds
        if f != 1 and not diagonal:
            weight_matrix = np.zeros((k, k))
            for i in range(k):
                weight_row = np.ones(k) * (1 - f) / (k - 1)
                weight_row[i] = f
                weight_matrix[i] = weight_row
            A = np.zeros((k, k))
            for i, row in enumerate(new_graph):
                A[i] = np.linalg.solve(weight_matrix, row)
            new_graph = A
        elif f != 1 and diagonal:
            A = np.zeros((k, k))
            for i in range(k):
                A[i, i] = new_graph[i, i] / f
            new_graph = A
        return new_graph

    weights_init = np.ones(k)
    weights = weights_init
    lp_duration = lp_rounds * lp_steps * k
    n_data = update_steps * batch - lp_duration
    counter, learned = 0, []
    num_iterations = -(-total_steps // update_steps)
    for i in range(num_iterations):
        loss_0 = sim.evaluate()
        graph = learn_params_subroutine(loss_0, i)
        counter += lp_duration
        if normalize:
            min_entry = graph.min()
            if min_entry < 0:
                graph -= min_entry
            graph /= graph.sum()
        if ema is not None:
            ema_graph = graph if i == 0 else (1 - ema) * graph + ema * ema_graph  # noqa: F821 (set at i == 0)
            weights = np.multiply(weights_init, np.exp(eta * ema_graph.sum(axis=0)))
        elif i == 0:
            weights = np.multiply(weights_init, np.exp(eta * graph.sum(axis=0)))
        else:
            weights = np.multiply(weights, np.exp(eta * graph.sum(axis=0)))
        learned.append(weights / sum(weights))
        for _ in range(-(-n_data // batch)):  # their dataloader over n_data sequences
            sim.train(weights / sum(weights), 1)
            counter += 1
            if counter % update_steps == 0:
                break
        if counter == total_steps:
            break
    return learned


AIOLI_CASES = {  # their runs' settings (scripts/*/aioli/run.sh) and the code paths they do not take
    "3-domain run": dict(k=3, eta=0.1, ema=0.5, f=0.5, lp_rounds=4, lp_steps=2, normalize=True, diagonal=False),
    "2-domain run": dict(k=2, eta=0.2, ema=0.1, f=0.625, lp_rounds=4, lp_steps=1, normalize=True, diagonal=False),
    "7-domain run": dict(k=7, eta=1.0, ema=0.1, f=0.75, lp_rounds=2, lp_steps=1, normalize=True, diagonal=False),
    "no ema, raw A": dict(k=4, eta=0.5, ema=None, f=0.6, lp_rounds=2, lp_steps=2, normalize=False, diagonal=False),
    "one-hot": dict(k=3, eta=1.0, ema=None, f=1.0, lp_rounds=1, lp_steps=3, normalize=True, diagonal=False),
    "diagonal": dict(k=3, eta=2.0, ema=0.3, f=0.5, lp_rounds=2, lp_steps=1, normalize=False, diagonal=True),
}


@pytest.mark.parametrize("case", sorted(AIOLI_CASES))
def test_aioli_matches_the_authors_update(case):
    """The same synthetic run through their loop and through our controller (hook, sampler, rule): the LearnParams
    mixtures and the learned weights of every round agree.

    Tolerance rtol 1e-12: the two sides differ only by rounding (theirs normalises exp(η·ΣA) at the end, ours in
    log space, and ours trains the loss model on the sampler's renormalised ŵ; the solve (cond(M) <= 4 here) and the
    cumulative path carry it over 6 rounds); the largest difference measured is 1.1e-14 (7 domains)."""
    from velocitune.controller import MixingController
    from velocitune.peers.aioli import make_aioli
    from velocitune.sampler import MixtureSampler

    c = AIOLI_CASES[case]
    k, batch, update_steps, rounds = c["k"], 8, 3 * c["lp_rounds"] * c["k"] * c["lp_steps"], 6
    steps = rounds * update_steps
    rng = np.random.default_rng(sum(map(ord, case)))
    ref_sim = LossModel(rng, k, batch)
    our_sim = copy.deepcopy(ref_sim)
    want = authors_aioli(ref_sim, k=k, eta=c["eta"], ema=c["ema"], f=c["f"], lp_rounds=c["lp_rounds"],
                         lp_steps=c["lp_steps"], update_steps=update_steps, normalize=c["normalize"],
                         diagonal=c["diagonal"], total_steps=steps, batch=batch, seed=7)
    names = [f"d{i}" for i in range(k)]
    params = dict(eta=c["eta"], one_hot_factor=c["f"], lp_rounds=c["lp_rounds"], lp_steps=c["lp_steps"],
                  update_steps=update_steps, normalize=c["normalize"], diagonal=c["diagonal"], seed=7)
    params.update(cumulative=True) if c["ema"] is None else params.update(ema=c["ema"])
    rule = make_aioli("aioli", np.ones(k) / k, names, **params)
    sampler = MixtureSampler(seed=0, global_batch=batch, windows_per_domain=[10**7] * k, initial_weights=np.ones(k) / k,
                             max_repetition=1.0, names=names)
    ctl = MixingController(rule, sampler, steps=steps, warmup=0, interval=1, signal="eval", targets=None, seq_len=4,
                           device=torch.device("cpu"), keep_records=True)
    ctl.start(our_sim.evaluate())
    for step in range(steps):
        our_sim.train(ctl.plan(step).sampling_weights, 1)
        if ctl.due(step + 1):
            ctl.update(step + 1, our_sim.evaluate(), None)
    mixes = [r for r in ctl.records if r["block"] == "mix"]
    assert len(mixes) == rounds and len(want) == rounds
    for r, (rec, ref) in enumerate(zip(mixes, want)):
        assert rec["step"] == r * update_steps + c["lp_rounds"] * k * c["lp_steps"]
        got = np.array([rec["weights"][n] for n in names])
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15, err_msg=f"{AIOLI_COMMIT}, {case}, round {r}")
    # The weights moved from uniform far beyond the tolerance: the comparison can fail.
    assert max(float(np.abs(w - 1 / k).max()) for w in want) > 1e-4
    np.testing.assert_allclose(our_sim.tokens, ref_sim.tokens, rtol=1e-12)  # same blocks, same mixtures, same steps


# ---------------------------------------------------------------------------------------------------- ADO
# yidingjiang/ado, commit 731863df66c2378e426eb07e188c8d731d58787d, src/data_selectors/ado.py: AdoSelector.update,
# curr_dist, compute_scaling_law_params (y_axis "train_loss", use_same_step_size True), clip_min_probability,
# huber_loss, logsumexp, loss_fn, scaling_law, fit_scaling_law. Theirs fits with jaxopt's LBFGS (vmapped over the
# 512 grid starts); jax is not installed here, so the transcription's fit runs scipy's L-BFGS-B on their loss_fn
# (gradient by central differences of it, so that it shares nothing with ours) from the grid starts of least
# objective, `starts` of them as our rule's default.
ADO_COMMIT = "yidingjiang/ado@731863df66c2378e426eb07e188c8d731d58787d"


def _ado_huber(target, pred, delta=1e-3):
    d = np.abs(target - pred)
    return np.where(d > delta, delta * (d - .5 * delta), 0.5 * d ** 2)


def _ado_logsumexp(a, axis):
    m = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True)) + m, axis=axis)


def _ado_loss_fn(params_3, D, L):
    a, e, alpha = params_3
    arg1 = a - alpha * np.log(D)
    pred = _ado_logsumexp(np.stack((arg1, e + np.zeros(arg1.shape)), axis=0), axis=0)
    return (np.sum(_ado_huber(np.log(L), pred)) + max(alpha - 0.8, 0) - min(alpha, 0.001) + max(a - 6.5, 0)
            - min(e - 0.5, 0))


def _ado_fit_scaling_law(D_T, losses_T, starts):
    from scipy.optimize import minimize

    X, Y, Z = np.meshgrid(np.arange(-2, 6, 1), np.arange(-2, 2, 0.5), np.arange(0, 0.8, 0.1), indexing="ij")
    grid = np.stack((X.flatten(), Y.flatten(), Z.flatten()), axis=1).astype(float)
    values = np.array([_ado_loss_fn(g, D_T, losses_T) for g in grid])
    results, finals = [], []
    for g in grid[np.argsort(values, kind="stable")[:starts]]:
        r = minimize(_ado_loss_fn, g, args=(D_T, losses_T), method="L-BFGS-B", jac="3-point",
                     options={"maxiter": 200, "gtol": 1e-5})
        results.append(r.x)
        finals.append(r.fun)
    return results[int(np.nanargmin(finals))]


def _ado_clip_min_probability(probs, min_prob):
    total_deficit = max(min_prob * len(probs) - probs.sum(), 0)
    scaled = probs * ((1 - total_deficit) / probs.sum())
    clipped = np.maximum(scaled, min_prob)
    return clipped / clipped.sum()


class AuthorsADO:
    """Transcription of AdoSelector (train-loss path, one host), its fit as described above."""

    def __init__(self, task_token_count, ignore_steps, start_step, update_interval, starts):
        self.k = len(task_token_count)
        self.empirical_dist = task_token_count / task_token_count.sum()
        self.ignore_steps, self.start_step, self.update_interval, self.starts = (
            ignore_steps, start_step, update_interval, starts)
        self.current_params = None
        self.task_cnt_TxK = np.empty((0, self.k), dtype=np.int32)
        self.task_loss_TxK = np.empty((0, self.k), dtype=np.float64)
        self.p = self.p_avg = self.p_history = self.empirical_dist

    def update(self, counts_K, task_loss_K, itr):
        self.task_cnt_TxK = np.append(self.task_cnt_TxK, np.ones_like(counts_K[None]) * counts_K.sum(), axis=0)
        self.p_history = 0.9 * self.p_history + 0.1 * counts_K / counts_K.sum()
        self.task_loss_TxK = np.append(self.task_loss_TxK, task_loss_K[None], axis=0)
        if itr >= self.start_step and itr % self.update_interval == 0:
            params = self.compute_scaling_law_params()
            if not (np.isnan(np.sum(params)) or np.isinf(np.sum(params))):
                self.current_params = params

    def compute_scaling_law_params(self):
        from scipy.signal import savgol_filter

        cum_cnt_KxT = np.cumsum(self.task_cnt_TxK, 0)[self.ignore_steps::10].T
        task_loss_KxT = savgol_filter(self.task_loss_TxK.T, 101, 3, axis=-1)[:, self.ignore_steps::10]
        return np.stack([_ado_fit_scaling_law(d, l, self.starts) for d, l in zip(cum_cnt_KxT, task_loss_KxT)])

    def curr_dist(self, itr):
        if itr < self.start_step or self.current_params is None:
            return None
        a, e, alpha = self.current_params[:, 0], self.current_params[:, 1], self.current_params[:, 2]
        irred_loss_K = np.exp(e)
        expnt_K = np.maximum(alpha, 0.05)
        n = self.task_cnt_TxK.sum(0)
        curr_loss_K = np.exp(e) + np.exp(a) / n ** alpha
        slope_K = expnt_K * (curr_loss_K - irred_loss_K) / np.float32(n)
        weighted = slope_K * self.empirical_dist * (self.p_history * (1 - self.p_history)) ** 0.5
        dist_K = _ado_clip_min_probability(weighted / weighted.sum(), 1e-2)
        self.p = 0.9 * self.p_avg + 0.1 * dist_K
        self.p_avg = (1 - 1 / (itr + 1)) * self.p_avg + 1 / (itr + 1) * dist_K
        return self.p


@pytest.mark.xfail(strict=True, reason="open (issue 27 item 5): with 4 starts the fits of ours and of the "
                   "transcription land in different local minima of their loss_fn (one domain's reducible loss 0.70 "
                   "vs 0.07 on the same points), and the first fit (one point) differs by the filter's left edge; "
                   "measured max |Δw| 0.10 / 0.08 / 0.16 over the three phases")
def test_ado_matches_the_authors_update():
    """A synthetic run of 600 steps (k = 3, 64 sequences a step, per-domain power laws plus noise): theirs with
    ignore_steps = update_interval = 119 (their 1000 of 60000 steps, scaled so their filter has its 101 rows) and
    start_step 59, ours first called after 120 steps (their itr 119) with refit = 119, both fed the same batches.

    Tolerance: the filter's first 50 points differ (theirs sees the rows before ignore_steps, ours starts at its
    first update) and the two L-BFGS-B runs differ in gradient (analytic vs differences) and rounding, so the fitted
    laws agree to ~1e-4 and the weights to 2e-3; the weights move by ~0.1 over the run."""
    rng = np.random.default_rng(0)
    names, batch, steps, first = ["a", "b", "c"], 64, 600, 119
    counts0 = np.array([5.0, 3.0, 2.0])
    truth = np.array([[1.5, 0.7, 0.4], [1.0, 0.9, 0.3], [2.0, 0.6, 0.5]])  # (a, e, α) per domain
    ref = AuthorsADO(counts0, ignore_steps=first, start_step=first // 2, update_interval=first, starts=4)
    ours = make_rule_ado(counts0 / counts0.sum(), names, refit=first, samples_per_step=batch, starts=4)
    moved = 0.0
    for itr in range(steps):
        p = np.asarray(ref.p, dtype=np.float64)
        counts = rng.multinomial(batch, p / p.sum())
        n = (itr + 1) * batch
        losses = np.exp(truth[:, 1]) + np.exp(truth[:, 0]) / n ** truth[:, 2] + rng.normal(0, 0.02, 3)
        ref.update(counts, losses, itr)
        want = ref.curr_dist(itr)
        if itr >= first:
            got = ours.update(itr + 1, losses, None, None, sampling_weights=counts / batch).weights
            np.testing.assert_allclose(got, want / want.sum(), atol=2e-3, err_msg=f"{ADO_COMMIT}, itr {itr}")
            moved = max(moved, float(np.abs(got - counts0 / counts0.sum()).max()))
        else:
            assert want is None
    assert moved > 0.05  # the comparison is not between two mixtures that never moved


def make_rule_ado(w0, names, **params):
    from velocitune.peers.ado import make_ado

    return make_ado("ado", w0, names, **params)


def test_ado_default_timing_is_the_authors():
    """Every step, training loss, first update after 1/60 of the run (their 1000 of 60000 steps)."""
    assert rule_timing("ado") == {"signal": "train", "interval": 1, "warmup": 1 / 60}
