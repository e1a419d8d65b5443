"""SFT masking and learning, batched generation against one-at-a-time greedy decoding, ROUGE against a
hand-worked example and rouge-score on ACI-Bench notes."""

import gzip
import hashlib
import json

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer

from medstate import MedstateError
from medstate.ssm import MambaLM, SSMConfig
from medstate.text.biomed.sft import SFTConfig, SFTTask, _rows, encode_example, finetune, task_examples
from medstate.text.examples import Example
from medstate.text.generate import generate_texts
from medstate.text.packing import IGNORE, collate
from medstate.text.rouge import rouge, rouge_per_document
from medstate.text.tokenizer import padded_vocab_size
from medstate.train.loop import TrainConfig


@pytest.fixture
def model(small_tokenizer):
    torch.manual_seed(0)
    config = SSMConfig(version=2, vocab_size=padded_vocab_size(len(small_tokenizer)), d_model=32, n_layer=2,
                       d_state=8, head_dim=8, chunk_size=8)  # fmt: skip
    return MambaLM(config).eval()


def test_encode_example_cuts_the_prompt_first(small_tokenizer):
    example = Example("x", "the patient was given aspirin for chest pain", " discharged home")
    prompt, response = small_tokenizer.encode(example.prompt), small_tokenizer.encode(example.response)
    tokens, start = encode_example(example, small_tokenizer, 64)
    assert tokens == [0, *prompt, *response, 0] and start == 1 + len(prompt)
    short, start = encode_example(example, small_tokenizer, len(response) + 4)
    assert short == [0, *prompt[-2:], *response, 0] and start == 3


def test_only_response_tokens_are_labels(small_tokenizer):
    examples = [Example(str(i), f"question {i} about aspirin", f" answer {i} follow up") for i in range(5)]
    batch = collate(_rows(examples, small_tokenizer, 48))
    scored = batch["labels"] != IGNORE
    labelled = small_tokenizer.decode(batch["labels"][scored].tolist())
    expected = "".join(f" answer {i} follow up" + small_tokenizer.eos_token for i in range(5))
    assert labelled == expected


def test_sft_learns_the_response_and_keeps_pubmedqa_test_out(small_tokenizer, model, tmp_path):
    from pathlib import Path

    records = tmp_path / "qa.jsonl"
    pairs = [("aspirin", "chest pain"), ("heparin", "platelet count"), ("scan", "no acute findings")] * 10
    records.write_text("\n".join(json.dumps({"id": i, "q": q, "a": a}) for i, (q, a) in enumerate(pairs)))
    model.save_pretrained(tmp_path / "init")
    small_tokenizer.save(tmp_path / "init")
    pubmedqa = Path(__file__).resolve().parents[2] / "data/demo/text/pubmedqa"
    tasks = [SFTTask("qa", "records", str(records), prompt="drug {q} for", response=" {a}", id_field="id"),
             SFTTask("pubmedqa", "pubmedqa", str(pubmedqa), limit=20)]  # fmt: skip
    test_ids = set(json.loads((pubmedqa / "test_ground_truth.json").read_text()))
    assert not {e.id.split(":")[1] for e in task_examples(SFTTask("p", "pubmedqa", str(pubmedqa)))} & test_ids
    # a held-out generation set: its prompt ("drug scan for") leaves training, its answers are scored with ROUGE
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"id": "h1", "q": "scan", "a": "no acute findings"}) + "\n")
    generation = SFTTask("held", "records", str(held), prompt="drug {q} for", response=" {a}", id_field="id")
    config = SFTConfig(init=str(tmp_path / "init"), tasks=tasks[:1], seq_len=64, batch_size=4, generate=[generation],
                       max_new_tokens=8, validation_fraction=0.0,
                       train=TrainConfig(max_steps=60, lr=1e-2, warmup_steps=5))  # fmt: skip
    result = finetune(config, tmp_path / "run")
    tuned = MambaLM.from_pretrained(result.model_dir)
    outputs = generate_texts(tuned, small_tokenizer, ["drug aspirin for", "drug heparin for"], max_new_tokens=24)
    assert outputs == [" chest pain", " platelet count"]
    assert result.metrics["removed_as_generation_prompts"] == 10 and result.metrics["train_examples"] == 20
    (line,) = (tmp_path / "run" / "generations-held.jsonl").read_text().splitlines()
    written = json.loads(line)
    assert written["reference"] == " no acute findings"
    assert written["output"] == generate_texts(tuned, small_tokenizer, ["drug scan for"], max_new_tokens=8)[0]
    expected = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(written["reference"], written["output"])
    assert result.metrics["generation_rouge"]["held"]["rouge1"]["value"] == pytest.approx(
        100 * expected["rouge1"].fmeasure
    )


def test_batched_generation_equals_one_at_a_time(model, small_tokenizer):
    prompts = ["the patient", "aspirin for chest pain and", "day"]
    batched = generate_texts(model, small_tokenizer, prompts, max_new_tokens=12, batch_size=3)
    for prompt, text in zip(prompts, batched):
        ids = torch.tensor([[small_tokenizer.eos_id, *small_tokenizer.encode(prompt)]])
        alone = model.generate(ids, 12, eos_token_id=small_tokenizer.eos_id)[0, ids.shape[1] :].tolist()
        alone = [t for t in alone if t != small_tokenizer.eos_id]
        assert text == small_tokenizer.decode(alone)
    stopped = generate_texts(model, small_tokenizer, prompts, max_new_tokens=12, stop=[batched[1][3:5]])
    assert stopped[1] == batched[1][:3] or batched[1][3:5] in batched[1][:3]
    sampled = [
        generate_texts(model, small_tokenizer, prompts, 12, temperature=1.0, top_p=0.9, seed=s) for s in (1, 1, 2)
    ]
    assert sampled[0] == sampled[1] != sampled[2]
    with pytest.raises(MedstateError):
        generate_texts(model, small_tokenizer, prompts, max_new_tokens=0)


def test_rouge_by_hand():
    scores = rouge_per_document(["the cat lay on the mat"], ["the cat sat on the mat"])
    assert scores["rouge1"][0] == pytest.approx(100 * 5 / 6)
    assert scores["rouge2"][0] == pytest.approx(100 * 3 / 5)
    assert scores["rougeL"][0] == pytest.approx(100 * 5 / 6)
    # stemming: "findings" and "finding" are the same word
    assert rouge_per_document(["no acute finding"], ["No acute findings."])["rouge1"][0] == pytest.approx(100)


def test_rouge_equals_rouge_score_on_aci_bench(shared_data):
    import csv

    with gzip.open(shared_data / "aci-bench/challenge_data/valid.csv.gz", "rt") as handle:
        notes = [row["note"] for row in csv.DictReader(handle)]
    # the first half of each note, its lines in reverse order: ROUGE-L (one sequence) drops, ROUGE-Lsum (lines
    # matched as sentences) does not
    predictions = ["\n".join(n.splitlines()[: len(n.splitlines()) // 2][::-1]) for n in notes]
    ours = rouge(predictions, notes, n_bootstrap=200)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    reference = [scorer.score(n, p) for p, n in zip(predictions, notes)]
    for kind, result in ours.items():
        assert result.value == pytest.approx(100 * np.mean([r[kind].fmeasure for r in reference]))
        assert result.low < result.value < result.high
    assert ours["rougeLsum"].value > ours["rougeL"].value + 10


def test_medquad_pairs(shared_data, tmp_path):
    from medstate.text.biomed.sft import medquad_pairs

    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "1.xml").write_text(
        '<Document id="1"><QAPairs><QAPair pid="1"><Question qid="1-1">What is X ?</Question>'
        '<Answer>X is\n   a thing.</Answer></QAPair><QAPair pid="2"><Question qid="1-2">Who?</Question>'
        "<Answer></Answer></QAPair></QAPairs></Document>"
    )
    assert list(medquad_pairs(tmp_path / "q")) == [("1-1", "What is X ?", "X is a thing.")]
    examples = task_examples(SFTTask("medquad", "medquad", str(shared_data / "medquad/MedQuAD-xml.tar.gz")))
    assert len(examples) == 16407  # SOURCE.md: QAPairs with a non-empty answer
    # a held-out sample spread over the whole collection (the first 20 pairs are one document's)
    path = str(shared_data / "medquad/MedQuAD-xml.tar.gz")
    first = task_examples(SFTTask("medquad", "medquad", path, limit=20))
    spread = task_examples(SFTTask("medquad", "medquad", path, limit=20, pick="spread"))
    assert first == examples[:20] and len({e.id[:15] for e in first}) == 1
    lowest = sorted(examples, key=lambda e: hashlib.blake2b(e.id.encode(), digest_size=8, salt=b"pick").digest())
    assert spread == lowest[:20] and len({e.id[:15] for e in spread}) > 10
    with pytest.raises(MedstateError):
        list(medquad_pairs(tmp_path / "nothing"))


def test_generation_stops_early_at_a_stop_string(model, small_tokenizer, monkeypatch):
    free = generate_texts(model, small_tokenizer, ["the patient"], max_new_tokens=40)[0]
    assert len(free) > 6
    steps = []
    original = model.step
    monkeypatch.setattr(model, "step", lambda *a, **k: steps.append(1) or original(*a, **k))
    stopped = generate_texts(model, small_tokenizer, ["the patient"], max_new_tokens=40, stop=[free[2:5]])[0]
    assert stopped == free[: free.index(free[2:5])]
    assert len(steps) < 39  # it stopped stepping once the stop string appeared, not at max_new_tokens


def test_beam_search_with_one_beam_is_greedy(model, small_tokenizer):
    from medstate.text.generate import beam_search

    ids = [small_tokenizer.eos_id, *small_tokenizer.encode("aspirin for chest pain and")]
    greedy = model.generate(torch.tensor([ids]), 12)[0, len(ids) :].tolist()
    assert beam_search(model, ids, 1, 12) == greedy
    end = greedy[4]  # taken as the end-of-text token: greedy stops before it, and so must the beam
    assert beam_search(model, ids, 1, 12, eos_id=end) == greedy[: greedy.index(end)]
    # through the text API: the decoded continuation
    (text,) = generate_texts(model, small_tokenizer, ["aspirin for chest pain and"], 12, num_beams=3)
    assert text == small_tokenizer.decode(beam_search(model, ids, 3, 12, eos_id=small_tokenizer.eos_id))


def test_beam_search_finds_the_best_of_all_continuations():
    from itertools import product

    from medstate.text.generate import beam_search

    torch.manual_seed(3)
    vocab, eos, penalty = 6, 5, 0.7
    model = MambaLM(SSMConfig(version=2, vocab_size=vocab, d_model=16, n_layer=2, d_state=8, head_dim=8,
                              chunk_size=8)).eval()  # fmt: skip
    prompt = [1, 3, 2]

    def summed(tokens):  # log-probability of the tokens after the prompt, read whole
        with torch.no_grad():
            logits = model(torch.tensor([prompt + list(tokens)])).logits[0].double().log_softmax(-1)
        return sum(float(logits[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens))

    candidates = []  # every continuation of up to 3 tokens: ended by eos, or still going at the limit
    for length in range(3):
        for body in product(range(eos), repeat=length):
            candidates.append((summed([*body, eos]) / (length + 1) ** penalty, list(body)))
    candidates += [(summed(body) / 3**penalty, list(body)) for body in product(range(eos), repeat=3)]
    best = max(candidates, key=lambda c: c[0])[1]
    # 25 beams hold every live prefix of 2 tokens: the search is exhaustive
    assert beam_search(model, prompt, 25, 3, eos_id=eos, length_penalty=penalty) == best
    # without an end token, 36 beams hold every 2-token prefix: the best 3-token continuation of all 216
    longest = max(product(range(vocab), repeat=3), key=summed)
    assert beam_search(model, prompt, 36, 3) == list(longest)


def test_paired_rouge_difference():
    from medstate.text.rouge import paired_rouge_difference

    references = ["no acute findings on the scan", "aspirin given for chest pain", "heparin was started today"]
    better = ["no acute findings on scan", "aspirin for chest pain", "heparin started"]
    worse = ["the scan", "pain", "started"]
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    expected = np.mean([100 * (scorer.score(r, a)["rouge1"].fmeasure - scorer.score(r, b)["rouge1"].fmeasure)
                        for r, a, b in zip(references, better, worse)])  # fmt: skip
    result = paired_rouge_difference(better, worse, references, n_bootstrap=500)
    assert result["rouge1"]["difference"] == pytest.approx(expected)
    assert 0 < result["rouge1"]["low"] <= expected <= result["rouge1"]["high"] and result["rouge1"]["p_not_better"] == 0
    same = paired_rouge_difference(better, better, references, n_bootstrap=100)["rouge2"]
    assert (same["difference"], same["low"], same["high"], same["p_not_better"]) == (0, 0, 0, 1)


def test_sft_validation_from_a_dataset_split(small_tokenizer, model, tmp_path):
    records, valid = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    records.write_text("\n".join(json.dumps({"id": i, "q": "aspirin", "a": "chest pain"}) for i in range(40)))
    valid.write_text("\n".join(json.dumps({"id": f"v{i}", "q": "scan", "a": "no findings"}) for i in range(3)))
    model.save_pretrained(tmp_path / "init")
    small_tokenizer.save(tmp_path / "init")
    task = dict(kind="records", prompt="drug {q} for", response=" {a}", id_field="id")
    config = SFTConfig(init=str(tmp_path / "init"), tasks=[SFTTask("qa", path=str(records), **task)], seq_len=32,
                       batch_size=4, validation=[SFTTask("qa-valid", path=str(valid), **task)],
                       train=TrainConfig(max_steps=2, lr=1e-3, warmup_steps=0, eval_every=1))  # fmt: skip
    result = finetune(config, tmp_path / "run")
    # the valid file is the validation set; every training example trains (no fraction is held out)
    assert result.metrics["validation_examples"] == 3 and result.metrics["train_examples"] == 40
    logged = [r.split(",")[5] for r in (tmp_path / "run/log.csv").read_text().splitlines()[1:]]
    assert sum(1 for v in logged if v) == 2
