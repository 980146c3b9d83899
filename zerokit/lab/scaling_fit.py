"""Compute-optimal scaling laws from sweep points (final validation loss L of a model with N parameters
trained on D tokens), in the two ways of the Chinchilla paper (Hoffmann et al. 2022):

approach 3  fit L(N, D) = E + A / N^alpha + B / D^beta by minimising the Huber loss (delta 1e-3) between
            the predicted and observed log L, from a grid of initialisations (the paper's section D.2);
            the compute-optimal split of C = 6 N D then follows: N_opt ∝ C^(beta / (alpha + beta)).
approach 1  the min-loss envelope: at each FLOP budget C, the lowest loss over the model sizes (each model's
            points interpolated in log C), N_opt refined by a parabola in log N through the best size and its
            neighbours; then log N_opt = a log C + c by least squares.

Uncertainty: the bootstrap over points (resample the points with replacement, refit, report the spread:
half the 16-84 % range of the estimates).
Every (bootstrap sample, initialisation) pair is an independent 5-parameter problem: all of them run side by
side in numpy, one batch of damped Newton steps with analytic derivatives (no scipy: numpy is always installed)."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

HUBER_DELTA = 1e-3  # the paper's delta: close to an L1 fit, robust to a few bad points
# The paper's grid of starting points for (alpha, beta, e = log E, a = log A, b = log B), made coarser
# (3 x 3 x 3 x 4 x 4 = 432 starts instead of 4500): every start runs in one batch.
INIT_GRID = {"alpha": (0.0, 0.5, 1.0), "beta": (0.0, 0.5, 1.0), "e": (-1.0, 0.0, 1.0),
             "a": (0.0, 5.0, 10.0, 20.0), "b": (0.0, 5.0, 10.0, 20.0)}
BOOT_STARTS = 16  # starts per bootstrap sample: the best grid starts of the fit to all points


@dataclass
class LawFit:
    """L(N, D) = E + A / N^alpha + B / D^beta, with bootstrap spreads (standard deviations) of each."""
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    n_points: int
    boot: dict = field(default_factory=dict)  # name -> array of bootstrap estimates

    @property
    def a(self) -> float:
        """N_opt ∝ C^a, D_opt ∝ C^(1 - a)."""
        return self.beta / (self.alpha + self.beta)

    def predict(self, n, d):
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def n_opt(self, c):
        """The compute-optimal model size at FLOPs c (C = 6 N D)."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        return g * np.power(np.asarray(c, float) / 6, self.a)

    def spread(self, name: str) -> float:
        """Half the 16-84 % range of the bootstrap estimates (one standard deviation for a normal spread,
        robust to the few resamples that lose a whole size and fit wild values)."""
        return _spread(self.boot.get(name))


def _spread(values) -> float:
    if values is None or len(values) < 2:
        return float("nan")
    lo, hi = np.percentile(values, [16, 84])
    return float(hi - lo) / 2


def _residuals(theta: np.ndarray, data: tuple) -> tuple[np.ndarray, np.ndarray]:
    """theta (K, 5) = (a, b, e, alpha, beta) -> residuals r = predicted - observed log L (K, P) and the
    softmax weights p (K, P, 3) of the three terms of log L = logsumexp(a - alpha x, b - beta z, e)."""
    x, z, y = data
    a, b, e, alpha, beta = (theta[:, i:i + 1] for i in range(5))
    t = np.stack([a - alpha * x, b - beta * z, np.broadcast_to(e, (len(theta), len(x)))], axis=-1)
    top = t.max(-1, keepdims=True)
    p = np.exp(t - top)
    total = p.sum(-1, keepdims=True)
    return (top + np.log(total))[..., 0] - y, p / total


def _huber(r: np.ndarray) -> np.ndarray:
    small = np.abs(r) <= HUBER_DELTA
    return np.where(small, 0.5 * r * r, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA))


def _newton_parts(theta: np.ndarray, data: tuple, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradient (K, 5) and Hessian (K, 5, 5) of sum_i w_i huber(r_i), analytically. With t_i = M_i theta
    (rows u_a of M_i), r_i's gradient is J_i = sum_a p_ia u_a and its Hessian sum_a p_ia u_a u_a^T - J_i J_i^T."""
    x, z, _ = data
    r, p = _residuals(theta, data)
    m = np.zeros((len(x), 3, 5))  # d t / d theta for each point
    m[:, 0, 0], m[:, 0, 3], m[:, 1, 1], m[:, 1, 4], m[:, 2, 2] = 1, -x, 1, -z, 1
    jac = np.einsum("kpa,pai->kpi", p, m)
    small = np.abs(r) <= HUBER_DELTA
    d1 = w * np.where(small, r, HUBER_DELTA * np.sign(r))  # huber' times the weight
    d2 = w * small                                         # huber''
    outer = np.einsum("pai,paj->paij", m, m).reshape(-1, 25)
    hess = ((d1[..., None] * p).reshape(len(theta), -1) @ outer).reshape(-1, 5, 5)
    hess += np.swapaxes(jac * (d2 - d1)[..., None], 1, 2) @ jac
    return np.einsum("kp,kpi->ki", d1, jac), hess


def _fit_batch(theta0: np.ndarray, log_n, log_d, log_l, weights: np.ndarray, iters: int = 400) -> tuple:
    """Independent Huber fits, one per row of theta0 (its point weights in the same row of `weights`), all
    at once: damped Newton steps (Levenberg-Marquardt), each problem with its own damping, a step kept only
    where it lowers that problem's objective; a problem leaves the batch once its steps vanish.
    Returns (theta, objective) per row."""
    data = tuple(np.asarray(v, dtype=float) for v in (log_n, log_d, log_l))
    w = np.asarray(weights, dtype=float)
    value = lambda th, wk: (_huber(_residuals(th, data)[0]) * wk).sum(-1)
    theta = np.array(theta0, dtype=float)
    current = value(theta, w)
    damping = np.full(len(theta), 1e-3)
    active = np.arange(len(theta))
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(iters):
            th, wk, mu = theta[active], w[active], damping[active]
            g, h = _newton_parts(th, data, wk)
            step = np.linalg.solve(h + mu[:, None, None] * np.eye(5), g[..., None])[..., 0]
            step = np.where(np.isfinite(step).all(-1, keepdims=True), step, g / mu[:, None])
            new = value(th - step, wk)
            better = np.isfinite(new) & (new < current[active])
            theta[active] = np.where(better[:, None], th - step, th)
            current[active] = np.where(better, new, current[active])
            damping[active] = mu = np.clip(np.where(better, mu / 3, mu * 4), 1e-12, 1e12)
            active = active[(np.abs(step).max(-1) > 1e-10) & (mu < 1e12)]
            if not len(active):
                break
    return theta, current


def _grid() -> np.ndarray:
    g = INIT_GRID
    return np.array([(a, b, e, al, be) for al, be, e, a, b in
                     itertools.product(g["alpha"], g["beta"], g["e"], g["a"], g["b"])], dtype=float)


def _best(theta: np.ndarray, obj: np.ndarray, rows: int) -> np.ndarray:
    """theta/obj hold `rows` problems of equal numbers of starts, one after another: each problem's best."""
    theta, obj = theta.reshape(rows, -1, 5), np.where(np.isfinite(obj), obj, np.inf).reshape(rows, -1)
    return theta[np.arange(rows), obj.argmin(1)]


def _polish(theta: np.ndarray, log_n, log_d, log_l, weights: np.ndarray) -> np.ndarray:
    """Each problem's best start run further."""
    return _fit_batch(theta, log_n, log_d, log_l, weights, iters=2000)[0]


def fit_law(n, d, loss, bootstrap: int = 100, seed: int = 0) -> LawFit:
    """Approach 3 on points (N_i, D_i, L_i); `bootstrap` resamples of the points give the spreads."""
    n, d, loss = (np.asarray(x, dtype=float) for x in (n, d, loss))
    if len(n) < 5:
        raise ValueError(f"approach 3 fits 5 parameters: it needs at least 5 points, got {len(n)}")
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    grid = _grid()
    ones = np.ones((len(grid), len(n)))
    theta, obj = _fit_batch(grid, log_n, log_d, log_l, ones, iters=100)
    order = np.argsort(np.where(np.isfinite(obj), obj, np.inf))
    best = _polish(_best(theta, obj, 1), log_n, log_d, log_l, ones[:1])[0]
    fit = LawFit(*_law(best), n_points=len(n))
    if bootstrap:
        rng = np.random.default_rng(seed)
        counts = np.stack([np.bincount(rng.integers(0, len(n), len(n)), minlength=len(n)) for _ in range(bootstrap)])
        starts = np.concatenate([best[None], grid[order[:BOOT_STARTS - 1]]])
        theta0 = np.tile(starts, (bootstrap, 1))
        weights = np.repeat(counts, len(starts), axis=0).astype(float)
        theta, obj = _fit_batch(theta0, log_n, log_d, log_l, weights, iters=100)
        boots = _polish(_best(theta, obj, bootstrap), log_n, log_d, log_l, counts.astype(float))
        laws = np.array([_law(t) for t in boots])
        fit.boot = {name: laws[:, i] for i, name in enumerate(("E", "A", "B", "alpha", "beta"))}
        fit.boot["a"] = laws[:, 4] / (laws[:, 3] + laws[:, 4])
    return fit


def _law(theta) -> tuple[float, float, float, float, float]:
    """(a, b, e, alpha, beta) -> (E, A, B, alpha, beta)."""
    a, b, e, alpha, beta = (float(x) for x in theta)
    return math.exp(e), math.exp(a), math.exp(b), alpha, beta


# ------------------------------------------------------------------------------------ approach 1
@dataclass
class EnvelopeFit:
    """N_opt = k C^a over the budgets where the envelope's minimum lies inside the swept sizes."""
    a: float
    log_k: float
    budgets: np.ndarray  # C of each envelope point
    n_opt: np.ndarray    # its N_opt
    boot: np.ndarray = field(default_factory=lambda: np.array([]))

    @property
    def a_spread(self) -> float:
        return _spread(self.boot)


def envelope(n, c, loss, budgets: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """(C, N_opt) along the min-loss envelope. Each model size's points, sorted by C, are interpolated
    linearly in (log C, log L); at each budget inside the C range of at least 3 sizes, the best size and
    its two neighbours (in log N) give a parabola whose vertex is N_opt. A budget whose best size is the
    smallest or largest of those present is not bracketed and is left out."""
    n, c, loss = (np.asarray(x, dtype=float) for x in (n, c, loss))
    sizes = np.unique(n)
    curves = {}
    for s in sizes:
        at = n == s
        order = np.argsort(c[at])
        if at.sum() >= 2:
            curves[s] = (np.log(c[at][order]), np.log(loss[at][order]))
    if len(curves) < 3:
        return np.array([]), np.array([])
    lo, hi = min(x[0][0] for x in curves.values()), max(x[0][-1] for x in curves.values())
    out_c, out_n = [], []
    for log_c in np.linspace(lo, hi, budgets):
        present = [(s, np.interp(log_c, lc, ll)) for s, (lc, ll) in curves.items() if lc[0] <= log_c <= lc[-1]]
        if len(present) < 3:
            continue
        present.sort()
        i = int(np.argmin([v for _, v in present]))
        if i in (0, len(present) - 1):
            continue
        x = np.log([present[j][0] for j in (i - 1, i, i + 1)])
        y = np.array([present[j][1] for j in (i - 1, i, i + 1)])
        p2, p1, _ = np.polyfit(x, y, 2)
        if p2 <= 0:
            continue
        out_c.append(math.exp(log_c))
        out_n.append(math.exp(min(max(-p1 / (2 * p2), x[0]), x[2])))
    return np.array(out_c), np.array(out_n)


def fit_envelope(n, c, loss, bootstrap: int = 200, seed: int = 0) -> EnvelopeFit | None:
    """Approach 1; None when the envelope has fewer than 3 bracketed budgets."""
    budgets, n_opt = envelope(n, c, loss)
    if len(budgets) < 3:
        return None
    a, log_k = np.polyfit(np.log(budgets), np.log(n_opt), 1)
    fit = EnvelopeFit(float(a), float(log_k), budgets, n_opt)
    rng = np.random.default_rng(seed)
    n, c, loss = (np.asarray(x, dtype=float) for x in (n, c, loss))
    boots = []
    for _ in range(bootstrap):
        pick = rng.integers(0, len(n), len(n))
        bc, bn = envelope(n[pick], c[pick], loss[pick])
        if len(bc) >= 3:
            boots.append(np.polyfit(np.log(bc), np.log(bn), 1)[0])
    fit.boot = np.array(boots)
    return fit
