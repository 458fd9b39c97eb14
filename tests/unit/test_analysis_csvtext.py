"""analysis.csvtext: the same text as DataFrame.to_csv(index=False), whichever writer."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis.csvtext import csv_text


def _frame(values: list[str | None], ints: list[int | None]) -> pd.DataFrame:
    return pd.DataFrame({"name": pd.array(values, dtype="string"),
                         "nan_na": pd.Series(values[::-1], dtype="str"),  # NaN, not pd.NA
                         "n": pd.array(ints, dtype="Int64"),
                         "v": pd.Series(range(len(values)), dtype="int64"),
                         "u": pd.Series(range(len(values)), dtype="uint64") + 2**63})


@pytest.mark.parametrize("values", [
    ["plain", "with space", "func [module]", "[user:low (static exe)]"],
    ["", None, "x", "ü-unicode"],
    ["a,b", "c", "d", "e"],          # needs quoting: pandas writes it
    ['say "hi"', "c", "d", "e"],
    ["line\nbreak", "c", "d", "e"],
    ["cr\r", "c", "d", "e"],
    ["  lead", "trail  ", "'single'", "semi;colon"],
])
def test_same_text_as_pandas(values: list[str | None]) -> None:
    df = _frame(values, [1, None, -3, 2**62])
    assert csv_text(df) == df.to_csv(index=False)


@pytest.mark.parametrize("df", [
    pd.DataFrame({"x": pd.array(["", None], dtype="string")}),  # one column: quoted ""
    pd.DataFrame({"f": [0.1, 1e-20], "s": ["a", "b"]}),           # floats
    pd.DataFrame({"b": [True, False], "s": ["a", "b"]}),           # booleans
    pd.DataFrame({"o": [1, "a"], "s": ["a", "b"]}),                # objects
    pd.DataFrame({"a,b": [1, 2], "s": ["a", "b"]}),                # a quoted header
    pd.DataFrame({"a": pd.array([], dtype="Int64"), "s": pd.array([], dtype="string")}),
    pd.DataFrame({"c": pd.Categorical([1, 2]), "s": ["a", "b"]}),
])
def test_other_tables_same_text(df: pd.DataFrame) -> None:
    assert csv_text(df) == df.to_csv(index=False)


def test_strings_and_integers_are_written_by_arrow(monkeypatch: pytest.MonkeyPatch) -> None:
    df = _frame(["plain", "func [module]", "", None], [1, None, -3, 2**62])
    expected = df.to_csv(index=False)
    monkeypatch.setattr(pd.DataFrame, "to_csv", lambda *a, **k: pytest.fail("pandas wrote it"))
    assert csv_text(df) == expected
