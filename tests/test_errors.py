"""The first bad row: one helper names it for every table and array the package checks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from learned_router.errors import DataError, RouterError, first_bad, first_index
from learned_router.evals.checks import as_array, as_unit
from learned_router.tasktypes import TaskTypeError, read_table


def test_first_index_and_first_bad():
    assert first_index([False, True, True]) == 1 and first_index(np.zeros(3, bool)) is None
    assert first_index(pd.Series([False, True], index=[10, 20])) == 1  # by position, not by label
    first_bad("f", [False, False], "never")
    with pytest.raises(DataError, match=r"^f: row 1: field 'x' is bad \(got 7.0\)$"):
        first_bad(
            "f",
            pd.Series([False, True], index=[5, 6]),
            "field 'x' is bad",
            pd.Series(np.array([1.0, 7.0]), index=[5, 6]),
        )
    with pytest.raises(RouterError, match="^f: line 3: empty$"):
        first_bad("f", [False, True], "empty", error=RouterError, unit="line", first=2)


def test_arrays_and_tables_name_their_first_bad_value(tmp_path):
    with pytest.raises(DataError, match=r"^p_weak: index 1: NaN or infinite, the first of 2 such values \(got nan\)$"):
        as_array([0.5, np.nan, np.inf], "p_weak")
    with pytest.raises(
        DataError, match=r"^weak quality: index 2: outside \[0, 1\], the first of 1 such values \(got 1.5\)$"
    ):
        as_unit([0, 1, 1.5], "weak quality")
    table = tmp_path / "t.csv"
    table.write_text("type,prompt\ncode,write a loop\nmath,\n")
    with pytest.raises(TaskTypeError, match=f"^{table}: line 3: empty type or prompt$"):
        read_table(table)
