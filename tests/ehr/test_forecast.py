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
    interval_days,
)
from medstate.ehr.model import EhrMamba, EhrMambaConfig
from medstate.ehr.sequences import ARRAYS, TYPE_INTERVAL, TYPE_REGISTER, TYPE_VISIT_START, interval_token
from medstate.ehr.vocab import Vocabulary
from tests.ehr.conftest import inputs_frame


def tiny_model(prepared):
    torch.manual_seed(0)
    vocab = Vocabulary.load(prepared / "vocab.json")
    config = EhrMambaConfig(vocab_size=len(vocab), d_model=32, n_layer=2, d_state=8, dropout=0.0)
    return EhrMamba(config).eval(), vocab


def histories(prepared, split="train"):
    frame = inputs_frame(prepared, "pretrain").filter(pl.col("split") == split)
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
    assert checked > 15


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
    """Recall@k recounted here from the definition: the truth is the event codes of each held-out subject's last
    stored visit; the population ranking is codes by the number of training subjects who have them (ties: lower
    id first); EhrMamba's ranking is the codes of its greedy visit, then the population's."""
    from medstate.ehr.sequences import SPECIAL_TOKENS, TYPE_EVENT

    model, vocab = tiny_model(prepared)
    k = 12  # more than the codes of an 8-token visit: its ranking holds all of them, then the population's
    config = ForecastConfig(samples=2, temperature=0.0, max_new_tokens=8, ks=(3, k), bootstrap=20)
    result = evaluate_forecast(model, prepared, "held_out", config)

    counts = {}
    for row in histories(prepared, "train"):
        for code in set(row["input_ids"][row["token_types"] == TYPE_EVENT].tolist()):
            counts[code] = counts.get(code, 0) + 1
    population = sorted((c for c in counts if c >= len(SPECIAL_TOKENS)), key=lambda c: (-counts[c], c))
    truths, greedy_codes = [], []
    sampler = VisitSampler(model, vocab)
    for arrays in histories(prepared, "held_out"):
        registers = np.flatnonzero(arrays["token_types"] == TYPE_REGISTER)
        starts = np.flatnonzero(arrays["token_types"] == TYPE_VISIT_START)
        if len(registers) < 2 or starts[-1] < registers[-2]:
            continue
        last = slice(starts[-1], registers[-1])
        truth = {int(c) for c, kind in zip(arrays["input_ids"][last], arrays["token_types"][last])
                 if kind == TYPE_EVENT and c >= len(SPECIAL_TOKENS)}  # fmt: skip
        if not truth:
            continue
        history = {name: values[: registers[-2] + 1] for name, values in arrays.items()}
        visit = sampler.sample(history, ForecastConfig(samples=1, temperature=0.0, max_new_tokens=8), None)[0]
        truths.append(truth)
        codes = [vocab.index[t] for t in visit.tokens if vocab.index.get(t, 0) >= len(SPECIAL_TOKENS)]
        greedy_codes.append(list(dict.fromkeys(codes)))  # each code once, in order
    assert result["subjects"] == len(truths) > 3

    def recall(ranked, truth):
        return len(truth & set(ranked)) / len(truth)

    expected_population = np.mean([recall(population[:k], truth) for truth in truths])
    expected_ehrmamba = np.mean(
        [recall((codes + [c for c in population if c not in codes])[:k], truth)
         for codes, truth in zip(greedy_codes, truths)]
    )  # fmt: skip
    got = {(r["ranking"], r["k"]): r for r in result["summary"]}
    assert got[("population frequency", k)]["recall"] == pytest.approx(expected_population)
    assert got[("ehrmamba", k)]["recall"] == pytest.approx(expected_ehrmamba)
    assert {name for name, _ in got} == {"ehrmamba", "population frequency", "patient history"}
