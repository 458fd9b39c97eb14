"""A table as CSV text, byte for byte what `DataFrame.to_csv(index=False)` writes, fast.

pandas formats a CSV row by row in Python (the cache model's symbol table, ~4*10^5 rows,
took 2-3 s); Arrow's writer does it in C++ (~0.2 s). The two agree on tables of strings
and integers as long as no value needs quoting: pandas quotes minimally, and Arrow
(quoting style "none") refuses a value with a delimiter, quote or line break rather
than writing it. So Arrow writes only such tables (its header is written here,
unquoted like pandas'), and pandas writes everything else: floats (the two format them
differently), booleans, other types, and any table Arrow refuses.
"""

from __future__ import annotations

import io
import os

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

_STRUCTURAL = (",", '"', "\n", "\r")


def _arrow_safe(df: pd.DataFrame) -> bool:
    """Columns whose text Arrow writes as pandas does: strings and integers, with plain
    string column names; two or more (Python's csv quotes the empty value of a row with
    one field), and rows ending in "\n" as pandas' do here (os.linesep)."""
    if len(df.columns) < 2 or os.linesep != "\n":
        return False
    for name, dtype in df.dtypes.items():
        if not isinstance(name, str) or not name or any(c in name for c in _STRUCTURAL):
            return False
        if not (isinstance(dtype, pd.StringDtype) or pd.api.types.is_integer_dtype(dtype)):
            return False
    return True


def csv_text(df: pd.DataFrame) -> str:
    """`df.to_csv(index=False)`, through Arrow's writer where that gives the same text."""
    if df.empty or not _arrow_safe(df):
        return str(df.to_csv(index=False))
    buf = io.BytesIO()
    try:
        table = pa.Table.from_pandas(df, preserve_index=False)
        pacsv.write_csv(table, buf, pacsv.WriteOptions(include_header=False,
                                                       quoting_style="none"))
    except pa.ArrowInvalid:  # a value needs quoting
        return str(df.to_csv(index=False))
    return ",".join(df.columns) + "\n" + buf.getvalue().decode()
