"""Whether an exported graph routes like the torch model it was exported from. numpy only: `Router` runs the same
check when it loads a folder on another CPU.

fp32 must match to float noise. int8 is judged by what a user feels, not by probes flipping one by one near the
threshold (onnxruntime's int8 kernels differ between AVX2, AVX-512 VNNI and ARM, and so do those flips): the share
of strong calls at the default threshold and, where graded prompts are given, routing quality (APGR). Each is a
paired bootstrap over prompts (95%), and the graph fails only when it is worse beyond both that noise and the
tolerance; a mean output shift catches a broken graph (a wrong one moves outputs by ~0.5). The strong share's
tolerance is 1 point or, when wider, the calibration table's own sampling error (95%, binomial at a share of 0.5):
the default threshold is a quantile of n calibration prompts, so on fresh prompts its share is only known to
+-1.96 * sqrt(0.25 / n), and a shift inside that is what recalibrating on another sample would do.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .outputs import pass_chances

GATES = {
    "fp32": {"max_abs_diff": 1e-3},
    "int8": {"mean_abs_diff": 0.05, "strong_share_shift": 0.01, "apgr_shift": 0.005},
}
BOOTSTRAP = 1000
MIN_GRADED = 30  # fewer graded probes than this: routing quality is not judged


# The instruction sets that pick onnxruntime's int8 kernels, as numpy's CPUID probe names them.
KERNEL_FLAGS = ("AVX2", "AVX512F", "AVX512VNNI", "AVXVNNI", "AVX512_SPR", "ASIMDDP", "ASIMDI8MM")


def cpu() -> str:
    """This processor and the instruction sets that pick int8 kernels, e.g. 'AMD EPYC (AVX2, AVX512F, AVX512VNNI;
    x86_64)'. The sets come from CPUID (numpy's probe), as onnxruntime reads them."""
    from numpy._core._multiarray_umath import __cpu_features__ as features

    name = platform.processor() or platform.machine()
    try:
        name = next(
            line.partition(":")[2].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    flags = [f for f in KERNEL_FLAGS if features.get(f)]
    return f"{name} ({', '.join(flags) or 'no AVX2'}; {platform.machine()})"


def share_tolerance(calibration_prompts: int) -> float:
    """The gate's strong-share tolerance for a router calibrated on that many prompts."""
    return max(GATES["int8"]["strong_share_shift"], 1.96 * float(np.sqrt(0.25 / max(calibration_prompts, 1))))


@dataclass(frozen=True)
class Graded:
    """Probes whose weak and strong answers were graded (absolute grades in [0, 1]): their rows in the probe list."""

    rows: np.ndarray
    weak: np.ndarray
    strong: np.ndarray


@dataclass
class Verdict:
    variant: str
    prompts: int
    max_abs_diff: float
    mean_abs_diff: float
    strong_share: float  # the variant's share of strong calls at the threshold
    strong_share_shift: float  # minus the reference's
    strong_share_shift_low: float  # its 95% interval
    strong_share_shift_high: float
    apgr_shift: float | None = None  # the variant's APGR minus the reference's, on the graded probes
    apgr_shift_low: float | None = None
    graded: int = 0
    failures: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.failures

    def figures(self) -> dict[str, float]:
        """The measured figures by name, for router.json's `parity` and MLflow."""
        return {k: float(v) for k, v in asdict(self).items() if isinstance(v, (int, float)) and k != "variant"}

    def summary(self) -> str:
        """One clause with the figures the gate judged."""
        share = (
            f"strong share {self.strong_share:.3f} ({self.strong_share_shift:+.3f} against the torch model, 95% "
            f"{self.strong_share_shift_low:+.3f} to {self.strong_share_shift_high:+.3f})"
        )
        apgr = (
            f", APGR {self.apgr_shift:+.4f} (95% low {self.apgr_shift_low:+.4f}) on {self.graded} graded"
            if self.apgr_shift is not None
            else ""
        )
        return f"{self.prompts} probe prompts: max |dq| {self.max_abs_diff:.4f}, mean |dq| {self.mean_abs_diff:.4f}, {share}{apgr}"


def bootstrap_interval(stat, n: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of stat(indices) over resamples of n prompts."""
    rng = np.random.default_rng(seed)
    values = np.array([stat(rng.integers(0, n, n)) for _ in range(BOOTSTRAP)])
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def apgr_of(p_weak: np.ndarray, weak: np.ndarray, strong: np.ndarray) -> float:
    """APGR of routing by the weak model's pass chance (low -> strong first), the exact curve over every share with
    ties entering together; NaN when the pair's mean grades are equal."""
    from .evals.frontier import apgr, sweep

    return apgr(
        sweep(1.0 - np.asarray(p_weak, float), weak, strong, quantiles=None), float(weak.mean()), float(strong.mean())
    )


def judge(
    variant: str,
    outputs: tuple[np.ndarray, np.ndarray],
    reference: tuple[np.ndarray, np.ndarray],
    pair: tuple[int, int],
    threshold: float,
    calibration_prompts: int,
    graded: Graded | None = None,
) -> Verdict:
    """The variant's (quality, difficulty) on the probes against the torch model's, for the (weak, strong) columns,
    at the default threshold of a router calibrated on `calibration_prompts`."""
    (q, d), (q_ref, d_ref) = outputs, reference
    diff = np.abs(np.c_[q - q_ref, d - d_ref])
    w, s = pair
    p, p_ref = pass_chances(q[:, w], q[:, s]), pass_chances(q_ref[:, w], q_ref[:, s])
    flips = (p < threshold).astype(float) - (p_ref < threshold)
    lo, hi = bootstrap_interval(lambda i: flips[i].mean(), len(flips))
    v = Verdict(
        variant,
        len(p),
        float(diff.max()),
        float(diff.mean()),
        float(np.mean(p < threshold)),
        float(flips.mean()),
        lo,
        hi,
    )
    gate = GATES[variant]
    failures = []
    if "max_abs_diff" in gate and v.max_abs_diff > gate["max_abs_diff"]:
        failures.append(f"max |dq| {v.max_abs_diff:.4g} > {gate['max_abs_diff']}")
    if "mean_abs_diff" in gate and v.mean_abs_diff > gate["mean_abs_diff"]:
        failures.append(f"mean |dq| {v.mean_abs_diff:.4g} > {gate['mean_abs_diff']}")
    tol = share_tolerance(calibration_prompts)
    if "strong_share_shift" in gate and lo * hi > 0 and min(abs(lo), abs(hi)) > tol:
        failures.append(f"strong share moves by {lo:+.3f} to {hi:+.3f} (95%), beyond {tol:.3f}")
    if graded is not None and len(graded.rows) >= MIN_GRADED and graded.weak.mean() != graded.strong.mean():
        pg, pg_ref, gw, gs = p[graded.rows], p_ref[graded.rows], graded.weak, graded.strong
        shift = lambda i: apgr_of(pg[i], gw[i], gs[i]) - apgr_of(pg_ref[i], gw[i], gs[i])  # noqa: E731
        v.graded, v.apgr_shift = len(pg), shift(np.arange(len(pg)))
        lo, hi = bootstrap_interval(lambda i: np.nan_to_num(shift(i)), len(pg))
        v.apgr_shift_low = lo
        if "apgr_shift" in gate and hi < -gate["apgr_shift"]:
            failures.append(
                f"APGR lower by {-v.apgr_shift:.4f} (95% {lo:+.4f} to {hi:+.4f}), beyond {gate['apgr_shift']}"
            )
    v.failures = tuple(failures)
    return v
