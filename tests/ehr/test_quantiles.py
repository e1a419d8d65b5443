"""The multi-pass quantile search against polars' in-memory `quantile(q, "linear")` and numpy's definition, with
windows small enough that the search has to narrow several times before it gathers."""

import numpy as np
import polars as pl
import pytest

import medstate.ehr.quantiles as quantiles_module
from medstate.ehr.quantiles import exact_quantiles

QS = [0.2, 0.4, 0.6, 0.8]


def frame(dtype):
    rng = np.random.default_rng(3)
    n = 60_000
    values = np.concatenate([
        rng.normal(100, 15, n // 2),
        rng.lognormal(0, 3, n // 4),  # skewed over many octaves
        np.round(rng.normal(5, 1, n - n // 2 - n // 4), 1),  # many ties
    ])  # fmt: skip
    rng.shuffle(values)
    codes = rng.choice(["A", "B", "C"], n)
    extra = {"code": ["ONE", "TIES", "TIES", "TIES", "HUGE", "HUGE", "HUGE"],
             "numeric_value": [3.0, 2.0, 2.0, 2.0, -3e38, 0.0, 3e38]}  # fmt: skip
    return pl.concat([
        pl.DataFrame({"code": codes, "numeric_value": values}),
        pl.DataFrame(extra),
    ]).with_columns(pl.col("numeric_value").cast(dtype))  # fmt: skip


def in_memory(data):
    aggs = (pl.col("numeric_value").quantile(q, "linear").alias(f"q{i}") for i, q in enumerate(QS))
    rows = data.group_by("code").agg(*aggs).sort("code").iter_rows()
    return {row[0]: [float(v) for v in row[1:]] for row in rows}


@pytest.mark.parametrize("dtype", [pl.Float32, pl.Float64])
@pytest.mark.parametrize(("buckets", "gather"), [(1024, 10**9), (16, 200), (2, 5)])
def test_equals_polars_in_memory_quantiles(dtype, buckets, gather, monkeypatch):
    data = frame(dtype)
    passes = []
    narrow = quantiles_module._narrow
    monkeypatch.setattr(quantiles_module, "_narrow", lambda *a: (passes.append(1), narrow(*a)))
    got = exact_quantiles(data.lazy(), "code", "numeric_value", QS, buckets=buckets, gather=gather, max_passes=40)
    assert got == in_memory(data)  # exactly, float32 rounding included
    assert (len(passes) == 0) == (gather == 10**9)  # the small windows did narrow, several times for 2 buckets
    assert gather == 10**9 or len(passes) >= {16: 1, 2: 5}[buckets]


def test_hand_worked_and_numpy():
    data = pl.DataFrame({"code": ["X"] * 5 + ["Y"] * 4, "numeric_value": [9.0, 1.0, 5.0, 3.0, 7.0, 4, 1, 3, 2]})
    got = exact_quantiles(data.lazy(), "code", "numeric_value", QS, buckets=2, gather=1)
    assert got["X"] == pytest.approx([2.6, 4.2, 5.8, 7.4])  # h = q·4 between 1, 3, 5, 7, 9
    assert got["Y"] == pytest.approx(np.quantile([1, 2, 3, 4], QS).tolist())


def test_pass_limit_gathers_what_is_left():
    data = frame(pl.Float64)
    got = exact_quantiles(data.lazy(), "code", "numeric_value", QS, buckets=2, gather=1, max_passes=1)
    assert got == in_memory(data)
