"""The top level of a two-level router: each model the user's own grades cover gets a correction of the prior's
quality, fitted on those grades alone. numpy only, so `Router` applies it beside the ONNX graph.

For a graded model m, with base_m(x) the prior's quality of m (or 1 - difficulty for a model the prior does not
know), the prompt's unit embedding e(x) and its standardised log length l(x):

    q_m(x) = clip(a_m + b_m * base_m(x) + c_m * l(x) + w_m . e(x) + k_m(x), 0, 1)

- a, b, c recalibrate the prior to the user's judge (unpenalised; b = 0 where cross-validation finds the prior
  misleads on the user's data); w is a ridge on the embedding (strength `ridge`; None leaves it out).
- k_m(x) is a kernel regression of the remaining residuals over the labelled prompts: sum_j K(x, x_j) r_j /
  (sum_j K(x, x_j) + shrink), K = exp(-(1 - cos(x, x_j)) / width). Where no labelled prompt is near, the sum of
  kernels is small against `shrink` and k_m(x) -> 0: the prompt gets the recalibrated prior. Beyond `CENTROIDS`
  labelled prompts the sums are kept per k-means centroid, so scoring costs one (centroids x dim) product.
- Which terms and how strong (ridge, width, shrink, or none) is chosen by 5-fold cross-validation on the user's
  data: the squared error of the pair's quality gap (strong minus weak, what routing ranks prompts by) where the
  data grades both models on enough prompts, else of the grades. The ridge's strength is the best figure's (it costs nothing to score); the kernel, whose scoring
  cost grows with the labelled prompts, is kept only when it beats the ridge alone beyond noise (a paired bootstrap
  over the prompts, 95%).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .outputs import GENERIC, Outputs

FILE = "residual.npz"
RIDGES = (None, 1000.0, 100.0, 30.0, 10.0, 3.0, 1.0)
LINEAR = [(b, r) for b in (True, False) for r in RIDGES]  # (with the prior's base output, ridge strength)
KERNELS = [(None, 0.0)] + [(w, s) for w in (0.02, 0.05, 0.1, 0.2) for s in (0.5, 2.0, 8.0)]
FOLDS = 5
CENTROIDS = 4096
MIN_PAIR = 50  # prompts graded for both models of the pair before the pair's gap picks the terms
CV_MAX = 10_000  # cross-validation looks at most at this many prompts (a random sample)
RESAMPLES = 200


@dataclass
class Choice:
    """What cross-validation chose, and its figure for each option tried."""

    use_base: bool
    ridge: float | None
    width: float | None
    shrink: float
    objective: str  # "pair gap MSE" or "grade MSE"
    tried: dict[str, float] = field(default_factory=dict)


def bases(
    quality: np.ndarray, difficulty: np.ndarray, graph_models: list[str], models: list[str]
) -> tuple[np.ndarray, list[str]]:
    """Each model's base output, (n, models): the prior graph's quality of it, or 1 - difficulty (generic) for a model
    the graph does not know; and the name of each base."""
    col = {m: i for i, m in enumerate(graph_models)}
    names = [m if m in col else GENERIC for m in models]
    return np.stack([quality[:, col[m]] if m in col else 1.0 - difficulty for m in models], axis=1), names


def log_length(prompts: list[str]) -> np.ndarray:
    return np.log(np.maximum([len(p) for p in prompts], 1)).astype(np.float32)


def design(
    base: np.ndarray, length: np.ndarray, emb: np.ndarray, ridge: float | None, use_base: bool = True
) -> np.ndarray:
    """[1, base (or 0), length, embedding (when ridge)]: the ridge's inputs."""
    cols = [np.ones_like(base), base if use_base else np.zeros_like(base), length]
    return np.c_[tuple(cols)] if ridge is None else np.c_[(*cols, emb)]


def fit_linear(
    base: np.ndarray, length: np.ndarray, emb: np.ndarray, y: np.ndarray, use_base: bool, ridges
) -> dict[float | None, np.ndarray]:
    """Least squares of `y` on `design(...)` for each ridge strength in `ridges`, the intercept, base and length
    unpenalised and the embedding at the ridge (None: left out); each coefficient vector in `design`'s layout. The
    embedding is first freed of what the unpenalised columns explain, so one eigendecomposition serves every ridge."""
    a = np.c_[np.ones_like(base), base if use_base else np.zeros_like(base), length].astype(np.float64)
    pinv = np.linalg.pinv(a)  # a zero base column (use_base False) gets a zero coefficient
    y = y.astype(np.float64)
    out: dict[float | None, np.ndarray] = {}
    if None in ridges:
        out[None] = (pinv @ y).astype(np.float32)
    strengths = [r for r in ridges if r is not None]
    if strengths:
        e = emb.astype(np.float64)
        e_free, y_free = e - a @ (pinv @ e), y - a @ (pinv @ y)
        dual = len(e) < e.shape[1]  # fewer prompts than dimensions: decompose the prompts' Gram matrix instead
        lam, vec = np.linalg.eigh(e_free @ e_free.T if dual else e_free.T @ e_free)
        proj = vec.T @ (y_free if dual else e_free.T @ y_free)
        for r in strengths:
            w = vec @ (proj / (np.maximum(lam, 0.0) + r))
            w = e_free.T @ w if dual else w
            out[r] = np.r_[pinv @ (y - e @ w), w].astype(np.float32)
    return out


def product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b, without BLAS for a few rows: a served prompt's product then runs on its own thread, and does not wait for
    BLAS's threads on a busy machine (measured: ~0.6 ms against ~3 ms for one 4,096-key product beside onnxruntime)."""
    return np.einsum("ij,jk->ik", a, b) if len(a) <= 16 else a @ b


def kernel_sums(
    query: np.ndarray, keys_t: np.ndarray, values: np.ndarray, counts: np.ndarray, width: float, block: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """(sum_j K r_j, sum_j K n_j) per query row; keys_t (dim x keys, contiguous) are the keys' unit embeddings,
    values (keys x models) their residual sums, counts their graded counts."""
    num = np.empty((len(query), values.shape[1]), np.float32)
    den = np.empty((len(query), values.shape[1]), np.float32)
    for i in range(0, len(query), block):
        num[i : i + block], den[i : i + block] = weighted(product(query[i : i + block], keys_t), values, counts, width)
    return num, den


def weighted(sim: np.ndarray, values: np.ndarray, counts: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray]:
    """(sum_j K r_j, sum_j K n_j) from the cosine similarities (queries x keys), K = exp(-(1 - cos) / width)."""
    k = np.exp((sim - 1.0) / width)
    return product(k, values), product(k, counts)


@dataclass
class Residual:
    """The fitted top level: per model, its base column and linear terms; the kernel's keys and sums."""

    models: list[str]  # the graded models, in the order of the arrays' model axis
    base: list[str]  # per model: the prior's output it corrects (a model name, or "generic")
    coef: np.ndarray  # (models, 3 or 3 + dim)
    length_mean: float
    length_std: float
    choice: Choice
    keys: np.ndarray | None = None  # (keys, dim) unit embeddings: labelled prompts, or centroids of them
    sums: np.ndarray | None = None  # (keys, models) residual sums
    counts: np.ndarray | None = None  # (keys, models) graded counts
    prompts: int = 0

    def __post_init__(self):
        self.keys_t = None if self.keys is None else np.ascontiguousarray(self.keys.T)

    def predict(self, base: np.ndarray, prompts_length: np.ndarray, emb: np.ndarray) -> np.ndarray:
        """q (n, models) from each model's base output (n, models), log lengths (n,) and unit embeddings (n, dim)."""
        z = ((prompts_length - self.length_mean) / self.length_std).astype(np.float32)
        out = np.empty_like(base, dtype=np.float32)
        for j in range(len(self.models)):
            out[:, j] = product(
                design(base[:, j], z, emb, self.choice.ridge, self.choice.use_base), self.coef[j][:, None]
            )[:, 0]
        if self.choice.width is not None:
            num, den = kernel_sums(emb, self.keys_t, self.sums, self.counts, self.choice.width)
            out += num / (den + self.choice.shrink)
        return np.clip(out, 0.0, 1.0)

    def apply(self, prior: Outputs, prompts: list[str], models: list[str]) -> Outputs:
        """The two-level router's outputs from its prior's on the same prompts (their embedding needed): `models` are
        the prior's, then the ones only the user's grades know; each graded model's quality is corrected."""
        base, _ = bases(prior.quality, prior.difficulty, list(prior.models), self.base)
        quality = np.empty((len(prompts), len(models)), dtype=np.float32)
        quality[:, : len(prior.models)] = prior.quality
        quality[:, [models.index(m) for m in self.models]] = self.predict(base, log_length(prompts), prior.embedding)
        return Outputs(tuple(models), prior.strong, quality, prior.difficulty, prior.embedding)

    def save(self, folder: Path) -> None:
        arrays = {"coef": self.coef}
        if self.keys is not None:
            arrays |= {"keys": self.keys, "sums": self.sums, "counts": self.counts}
        meta = {
            "models": self.models,
            "base": self.base,
            "length_mean": self.length_mean,
            "length_std": self.length_std,
            "choice": asdict(self.choice),
            "prompts": self.prompts,
        }
        np.savez(Path(folder) / FILE, meta=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path: Path) -> "Residual":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return cls(
                models=meta["models"],
                base=meta["base"],
                coef=z["coef"],
                length_mean=meta["length_mean"],
                length_std=meta["length_std"],
                choice=Choice(**meta["choice"]),
                prompts=meta["prompts"],
                **{k: z[k] for k in ("keys", "sums", "counts") if k in z},
            )


def _linear_folds(base, z, emb, grades, folds, use_base, ridges) -> dict[float | None, tuple[list, list]]:
    """Per ridge strength, per fold: the linear terms' out-of-fold q of its test rows, and the residuals of its train
    rows (0 where a model is not graded)."""
    out: dict[float | None, tuple[list, list]] = {r: ([], []) for r in ridges}
    for train, test in folds:
        preds = {r: np.empty((len(test), grades.shape[1]), np.float32) for r in ridges}
        resids = {r: np.zeros((len(train), grades.shape[1]), np.float32) for r in ridges}
        for j in range(grades.shape[1]):
            rows = train[~np.isnan(grades[train, j])]
            coefs = fit_linear(base[rows, j], z[rows], emb[rows], grades[rows, j], use_base, ridges)
            x_test, x_train = (design(base[i, j], z[i], emb[i], 1.0, use_base) for i in (test, train))  # every column
            for r, coef in coefs.items():  # a coefficient vector without the embedding's reads the first columns
                preds[r][:, j] = x_test[:, : len(coef)] @ coef
                fitted = x_train[:, : len(coef)] @ coef
                resids[r][:, j] = np.where(np.isnan(grades[train, j]), 0.0, np.nan_to_num(grades[train, j]) - fitted)
        for r in ridges:
            out[r][0].append(preds[r])
            out[r][1].append(resids[r])
    return out


def objective(q: np.ndarray, grades: np.ndarray, pair: tuple[int, int] | None, rows: np.ndarray | None = None) -> float:
    """Higher is better: minus the mean squared error of the pair's quality gap (q_s - q_w against the grades' gap)
    on the prompts graded for both, else of the grades; on `rows` (a resample) when given."""
    if rows is not None:
        q, grades = q[rows], grades[rows]
    if pair is not None:
        w, s = pair
        both = ~np.isnan(grades[:, w]) & ~np.isnan(grades[:, s])
        return -float(np.mean(((q[both, s] - q[both, w]) - (grades[both, s] - grades[both, w])) ** 2))
    mask = ~np.isnan(grades)
    return -float(np.mean((q[mask] - grades[mask]) ** 2))


def better_beyond_noise(q_new: np.ndarray, q_old: np.ndarray, grades: np.ndarray, pair, seed: int) -> bool:
    """Whether `q_new` beats `q_old` on every side of a 95% paired bootstrap over the prompts."""
    rng = np.random.default_rng(seed)
    n = len(grades)
    gains = [
        objective(q_new, grades, pair, i) - objective(q_old, grades, pair, i)
        for i in (rng.integers(0, n, n) for _ in range(RESAMPLES))
    ]
    return float(np.nanpercentile(gains, 2.5)) > 0


def fit(
    base: np.ndarray,
    lengths: np.ndarray,
    emb: np.ndarray,
    grades: np.ndarray,
    models: list[str],
    base_names: list[str],
    pair: tuple[int, int] | None,
    seed: int = 0,
) -> Residual:
    """The top level on n labelled prompts: each model's base output (n, models), log lengths (n,), unit embeddings
    (n, dim) and grades in [0, 1] (n, models; NaN where a model is not graded). `pair`: the (weak, strong) model
    axes whose gap's squared error picks the terms, or None for the grades'."""
    n = len(grades)
    if pair is not None:
        both = ~np.isnan(grades[:, pair[0]]) & ~np.isnan(grades[:, pair[1]])
        if both.sum() < MIN_PAIR or np.nanmean(grades[both, pair[0]]) == np.nanmean(grades[both, pair[1]]):
            pair = None
    mean, std = float(lengths.mean()), float(lengths.std() or 1.0)
    z = ((lengths - mean) / std).astype(np.float32)
    cv = np.random.default_rng(seed).permutation(n)[:CV_MAX]
    folds = [(cv[np.arange(len(cv)) % FOLDS != f], cv[np.arange(len(cv)) % FOLDS == f]) for f in range(FOLDS)]
    order = np.concatenate([test for _, test in folds])

    def judged(preds: list[np.ndarray]) -> float:
        return objective(np.clip(np.concatenate(preds), 0.0, 1.0), grades[order], pair)

    label = lambda b, r: f"base={b} ridge={r}"  # noqa: E731
    runs = {
        (b, r): run for b in (True, False) for r, run in _linear_folds(base, z, emb, grades, folds, b, RIDGES).items()
    }
    tried = {label(*o): judged(runs[o][0]) for o in LINEAR}
    use_base, ridge = LINEAR[int(np.nanargmax([tried[label(*o)] for o in LINEAR]))]
    linear, resids = runs[use_base, ridge]
    best, width, shrink, best_q = tried[label(use_base, ridge)], None, 0.0, None
    sims = [emb[test] @ emb[train].T for train, test in folds]
    for w in sorted({w for w, _ in KERNELS[1:]}):
        sums = [
            weighted(sim, resid, (~np.isnan(grades[train])).astype(np.float32), w)
            for (train, _), sim, resid in zip(folds, sims, resids)
        ]
        for s in sorted({s for ww, s in KERNELS[1:] if ww == w}):
            q = np.clip(np.concatenate([lin + num / (den + s) for lin, (num, den) in zip(linear, sums)]), 0.0, 1.0)
            tried[f"{label(use_base, ridge)} width={w} shrink={s}"] = figure = objective(q, grades[order], pair)
            if figure > best:
                best, width, shrink, best_q = figure, w, s, q
    if best_q is not None and not better_beyond_noise(
        best_q, np.clip(np.concatenate(linear), 0.0, 1.0), grades[order], pair, seed
    ):
        width, shrink = None, 0.0
    choice = Choice(
        use_base,
        ridge,
        width,
        shrink,
        "pair gap MSE" if pair is not None else "grade MSE",
        {k: round(float(v), 5) for k, v in tried.items()},
    )

    coef, resid = [], np.zeros(grades.shape, np.float32)
    for j in range(grades.shape[1]):
        rows = np.flatnonzero(~np.isnan(grades[:, j]))
        c = fit_linear(base[rows, j], z[rows], emb[rows], grades[rows, j], use_base, [ridge])[ridge]
        coef.append(c)
        resid[rows, j] = grades[rows, j] - design(base[rows, j], z[rows], emb[rows], ridge, use_base) @ c
    keys = sums = counts = None
    if width is not None:
        counts = (~np.isnan(grades)).astype(np.float32)
        keys, sums = emb.astype(np.float32), resid
        if n > CENTROIDS:
            from sklearn.cluster import MiniBatchKMeans

            km = MiniBatchKMeans(CENTROIDS, random_state=seed, n_init=1, batch_size=4096).fit(emb)
            onehot = np.zeros((CENTROIDS, n), np.float32)
            onehot[km.labels_, np.arange(n)] = 1.0
            centres = km.cluster_centers_
            keys = (centres / np.linalg.norm(centres, axis=1, keepdims=True).clip(1e-9)).astype(np.float32)
            sums, counts = onehot @ resid, onehot @ counts
        sums, counts = sums.astype(np.float32), counts.astype(np.float32)
    return Residual(
        list(models), list(base_names), np.array(coef, np.float32), mean, std, choice, keys, sums, counts, n
    )
