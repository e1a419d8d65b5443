"""Forecasting: generated tokens get the arrays `build_sequence` would give them, sampling with the recurrent state
equals the full forward, and recall@k is computed as defined."""

import numpy as np
import polars as pl
import pytest
import torch

from medstate.ehr.batching import collate
from medstate.ehr.forecast import (
    ForecastConfig,
    VisitClock,
    VisitSampler,
    _rank,
    evaluate_forecast,
    forecast_points,
    interval_days,
    population_ranking,
)
from medstate.ehr.model import ARRAYS, EhrMamba, EhrMambaConfig
from medstate.ehr.sequences import TYPE_INTERVAL, TYPE_REGISTER, TYPE_VISIT_END, TYPE_VISIT_START, interval_token
from medstate.ehr.vocab import Vocabulary


def tiny_model(prepared):
    torch.manual_seed(0)
    vocab = Vocabulary.load(prepared / "vocab.json")
    config = EhrMambaConfig(vocab_size=len(vocab), d_model=32, n_layer=2, d_state=8, dropout=0.0)
    return EhrMamba(config).eval(), vocab


def histories(prepared, split="train"):
    frame = pl.read_parquet(prepared / "pretrain.parquet").filter(pl.col("split") == split)
    return [{name: np.asarray(row[name]) for name in ARRAYS} for row in frame.iter_rows(named=True)]


def test_interval_days():
    assert interval_days("[W0]") == 3.5 and interval_days("[W3]") == 24.5
    assert interval_days("[M1]") == 45 and interval_days("[M12]") == 375
    assert interval_days("[LT]") == pytest.approx(547.875)


def test_clock_lays_out_tokens_as_build_sequence_does(prepared):
    model, vocab = tiny_model(prepared)
    sampler = VisitSampler(model, vocab)
    checked = 0
    for arrays in histories(prepared):
        if arrays["visit_orders"][arrays["visit_orders"] > 0].min() != 1:
            continue  # truncated: the latest visit end may lie in the cut-off part
        registers = np.flatnonzero(arrays["token_types"] == TYPE_REGISTER)
        for cut in registers[:-1] + 1:  # continue after each [REG] that has a later visit
            clock = VisitClock(sampler, {name: values[:cut] for name, values in arrays.items()}, 1)
            stop = registers[registers >= cut][0] + 1
            for position in range(cut, stop):
                step = clock.advance(torch.tensor([arrays["input_ids"][position]]))
                for name in ("token_types", "visit_segments", "visit_orders"):
                    assert step[name].item() == arrays[name][position], (name, position)
                if arrays["token_types"][position] == TYPE_INTERVAL:
                    token = vocab.tokens[arrays["input_ids"][position]]
                    # the token says the gap since the latest visit end; the clock moves on by its middle
                    latest_end = arrays["times"][:cut][arrays["token_types"][:cut] == TYPE_REGISTER].max()
                    gap = float(arrays["times"][position] - latest_end)
                    assert interval_token(gap) == token, gap
                    assert step["times"].item() == pytest.approx(arrays["times"][cut - 1] + interval_days(token))
            checked += 1
    assert checked > 30


def test_greedy_sampling_with_the_state_equals_the_full_forward(prepared):
    model, vocab = tiny_model(prepared)
    sampler = VisitSampler(model, vocab)
    history = next(h for h in histories(prepared) if (h["token_types"] == TYPE_REGISTER).sum() >= 2)
    cut = np.flatnonzero(history["token_types"] == TYPE_REGISTER)[0] + 1
    history = {name: values[:cut] for name, values in history.items()}
    visits = sampler.sample(history, ForecastConfig(samples=3, temperature=0.0, max_new_tokens=12), torch.Generator())
    assert all(v.tokens == visits[0].tokens for v in visits)  # greedy: every draw the same
    generated = visits[0].arrays
    assert len(generated["input_ids"]) >= 2
    whole = {name: np.concatenate([history[name], generated[name]]) for name in ARRAYS}
    with torch.no_grad():
        batch = collate([whole])
        hidden, _ = model.lm.backbone(inputs_embeds=model.embeddings(batch))
        logits = model.lm.lm_head(hidden)[0].index_fill(-1, sampler.banned, -torch.inf)
    predicted = logits[cut - 1 : cut - 1 + len(generated["input_ids"])].argmax(-1)
    assert predicted.tolist() == generated["input_ids"].tolist()


def test_sampled_visits_end_at_visit_end(prepared):
    model, vocab = tiny_model(prepared)
    sampler = VisitSampler(model, vocab)
    history = histories(prepared)[0]
    visits = sampler.sample(history, ForecastConfig(samples=8, max_new_tokens=40), torch.Generator().manual_seed(1))
    for visit in visits:
        assert len(visit.tokens) == len(visit.arrays["input_ids"]) <= 40
        assert visit.complete == (visit.tokens[-1] == "[VE]")
        assert "[VE]" not in visit.tokens[:-1]
        assert all(vocab.tokens[c] in visit.tokens for c in visit.codes)


def test_rank_falls_back_to_population_order():
    population = np.array([5, 3, 9, 1, 7])
    scores = np.zeros(10)
    scores[[7, 1]] = [2.0, 5.0]
    assert _rank(scores, population, 4).tolist() == [1, 7, 5, 3]
    assert _rank(np.zeros(10), population, 3).tolist() == [5, 3, 9]


def test_recall_at_k_against_an_independent_count(prepared):
    model, vocab = tiny_model(prepared)
    config = ForecastConfig(samples=2, max_new_tokens=8, ks=(5, 10), bootstrap=20)
    result = evaluate_forecast(model, prepared, "held_out", config)
    points = forecast_points(prepared, "held_out")
    assert result["subjects"] == len(points) > 0
    for _, history, truth in points:
        assert history["token_types"][-1] == TYPE_REGISTER and truth
        assert TYPE_VISIT_START not in history["token_types"][-1:]
    population = population_ranking(prepared, len(vocab)).tolist()
    for k in (5, 10):
        expected = np.mean([len(truth & set(population[:k])) / len(truth) for _, _, truth in points])
        row = next(r for r in result["summary"] if r["ranking"] == "population frequency" and r["k"] == k)
        assert row["recall"] == pytest.approx(expected)
        assert row["ci_low"] <= row["recall"] <= row["ci_high"]
    rankings = {r["ranking"] for r in result["summary"]}
    assert rankings == {"ehrmamba", "population frequency", "patient history"}
    assert all(0 <= r["recall"] <= 1 for r in result["summary"])
    assert TYPE_VISIT_END  # the truth is the last visit's events: [VS] … [VE] of the stored sequence
