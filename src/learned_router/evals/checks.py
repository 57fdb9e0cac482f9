"""Input checks for the evaluation maths: bad arrays raise DataError naming the problem."""

from __future__ import annotations

import numpy as np

from ..errors import DataError, first_bad


def as_array(values, name: str, n: int | None = None) -> np.ndarray:
    """A non-empty, finite 1-D float array (of length `n` when given)."""
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise DataError(f"{name}: expected numbers") from None
    if arr.ndim != 1:
        raise DataError(f"{name}: expected a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise DataError(f"{name}: empty")
    if n is not None and arr.size != n:
        raise DataError(f"{name}: {arr.size} values, expected {n} (one per prompt)")
    bad = ~np.isfinite(arr)
    first_bad(name, bad, f"NaN or infinite, the first of {int(bad.sum())} such values", arr, unit="index")
    return arr


def as_unit(values, name: str, n: int | None = None) -> np.ndarray:
    """Like `as_array`, and every value in [0, 1] (qualities, probabilities, labels)."""
    arr = as_array(values, name, n)
    out = (arr < 0) | (arr > 1)
    first_bad(name, out, f"outside [0, 1], the first of {int(out.sum())} such values", arr, unit="index")
    return arr


def as_binary(values, name: str, n: int | None = None) -> np.ndarray:
    """Labels: every value 0 or 1."""
    arr = as_array(values, name, n)
    if not np.isin(arr, (0.0, 1.0)).all():
        raise DataError(f"{name}: labels must be 0 or 1")
    return arr


def as_pair(weak, strong) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt weak and strong qualities in [0, 1], of equal length."""
    weak = as_unit(weak, "weak quality")
    return weak, as_unit(strong, "strong quality", weak.size)


def as_embeddings(values, name: str, dim: int | None = None) -> np.ndarray:
    """A finite 2-D float array with at least one row (and `dim` columns when given)."""
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise DataError(f"{name}: expected numbers") from None
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise DataError(f"{name}: expected a non-empty 2-D array (prompts x dims), got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise DataError(f"{name}: {arr.shape[1]} dims, expected {dim} like the training embeddings")
    if not np.isfinite(arr).all():
        raise DataError(f"{name}: NaN or infinite values")
    return arr


def as_weights(values, n: int) -> np.ndarray:
    """Sample weights: positive, one per training prompt; None means all 1."""
    if values is None:
        return np.ones(n)
    arr = as_array(values, "sample_weight", n)
    if (arr <= 0).any():
        raise DataError("sample_weight: every weight must be > 0")
    return arr
