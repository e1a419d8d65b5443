"""The continued-pretraining recipe: a run killed after a checkpoint resumes to the same weights, EMA, data position
and log as an uninterrupted one; gradient accumulation equals one large batch; held-out text never reaches
training; the exported model is the best validated EMA model."""

import dataclasses
import json
import random

import pytest
import torch
import yaml
from safetensors.torch import load_file

from medstate.text.corpora import CorpusSource
from medstate.text.mixing import MixedStream
from medstate.text.pretrain import PretrainConfig, RowBatches, language_model_loss, pretrain
from medstate.train.loop import TrainConfig, Trainer

SENTENCES = [
    "the patient was given aspirin for chest pain",
    "discharged home on day three with follow up",
    "heparin was started and the platelet count monitored",
    "the scan showed no acute findings",
    "a random sentence about the weather in spring",
    "the committee met on tuesday to discuss the budget",
]


class Killed(Exception):
    pass


def bio_text(i):
    rng = random.Random(i)
    words = " ".join(SENTENCES[:4]).split()
    return f"case {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(8, 30)))


@pytest.fixture
def corpus_dir(tmp_path, small_tokenizer):
    small_tokenizer.save(tmp_path / "tok")
    with open(tmp_path / "bio.jsonl", "w") as handle:
        for i in range(40):
            handle.write(json.dumps({"id": i, "text": bio_text(i)}) + "\n")
    with open(tmp_path / "general.jsonl", "w") as handle:
        for i in range(10):
            handle.write(json.dumps({"id": i, "text": f"{SENTENCES[4 + i % 2]} number {i}"}) + "\n")
    with open(tmp_path / "heldout.jsonl", "w") as handle:
        # bio document 7, word for word: the guard must keep it out of training
        handle.write(json.dumps({"id": 100, "text": bio_text(7)}) + "\n")
        handle.write(json.dumps({"id": 101, "text": "heparin and aspirin were given on day three"}) + "\n")
    return tmp_path


def config(corpus_dir, **train):
    return PretrainConfig(
        tokenizer=str(corpus_dir / "tok"),
        model={"version": 2, "d_model": 16, "n_layer": 2, "d_state": 8, "head_dim": 8, "chunk_size": 8},
        seq_len=32,
        batch_size=3,
        corpora=[
            CorpusSource("bio", str(corpus_dir / "bio.jsonl"), id_field="id", weight=0.8),
            CorpusSource("general", str(corpus_dir / "general.jsonl"), id_field="id", weight=0.2),
        ],
        validation=[CorpusSource("heldout", str(corpus_dir / "heldout.jsonl"), id_field="id")],
        ngram=5,
        eval_length=64,
        train=TrainConfig(
            **{
                "max_steps": 8,
                "lr": 3e-3,
                "schedule": "wsd",
                "layer_decay": 0.8,
                "ema_decay": 0.9,
                "save_every": 4,
                "eval_every": 2,
                "warmup_steps": 0,
                **train,
            }
        ),
    )


def test_killed_run_resumes_exactly(corpus_dir, tmp_path):
    whole = pretrain(config(corpus_dir), tmp_path / "whole")

    def kill_after_checkpoint(step, total, loss):
        if step == 6:  # the checkpoint of step 4 is on disk, steps 5 and 6 are lost
            raise Killed

    with pytest.raises(Killed):
        pretrain(config(corpus_dir), tmp_path / "killed", kill_after_checkpoint)
    resumed = pretrain(config(corpus_dir), tmp_path / "killed")
    assert resumed.metrics["resumed_from"] == 4
    for name in ("checkpoints/last/model.safetensors", "model/model.safetensors"):
        a, b = load_file(whole.run_dir / name), load_file(resumed.run_dir / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    state_a = torch.load(whole.run_dir / "checkpoints/last/trainer_state.pt", weights_only=True)
    state_b = torch.load(resumed.run_dir / "checkpoints/last/trainer_state.pt", weights_only=True)
    assert state_a["data"] == state_b["data"]
    assert all(torch.equal(state_a["ema"][k], state_b["ema"][k]) for k in state_a["ema"])
    log_a = (whole.run_dir / "log.csv").read_text().splitlines()
    log_b = (resumed.run_dir / "log.csv").read_text().splitlines()
    loss = [[line.split(",")[:2] for line in log] for log in (log_a, log_b)]
    assert loss[0] == loss[1] and len(log_a) == len(log_b)


def test_exported_model_is_the_best_validated_ema_model(corpus_dir, tmp_path):
    result = pretrain(config(corpus_dir), tmp_path / "run")
    best = json.loads((result.run_dir / "checkpoints/best/best.json").read_text())
    validations = [
        float(r.split(",")[5]) for r in (result.run_dir / "log.csv").read_text().splitlines()[1:] if r.split(",")[5]
    ]
    assert best["validation"] == pytest.approx(min(validations), abs=1e-6) and len(validations) == 4
    exported = load_file(result.run_dir / "model/model.safetensors")
    assert all(
        torch.equal(t, load_file(result.run_dir / "checkpoints/best/model.safetensors")[k]) for k, t in exported.items()
    )
    last = load_file(result.run_dir / "checkpoints/last/model.safetensors")  # trained weights, not the EMA
    assert best["step"] != 8 or any(not torch.equal(t, last[k]) for k, t in exported.items())
    assert (result.run_dir / "model/tokenizer.json").is_file()
    resolved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert resolved["train"]["layer_decay"] == 0.8 and resolved["tokenizer"].endswith("tok")


def test_held_out_text_never_reaches_training(corpus_dir, tmp_path, small_tokenizer):
    result = pretrain(config(corpus_dir, max_steps=2), tmp_path / "run")
    report = json.loads((result.run_dir / "contamination.json").read_text())
    assert report["removed"] == {"bio": {"ngram": 1}}
    assert report["documents"] == [{"source": "bio", "id": "bio:7", "matches": "heldout:100"}]
    settings = config(corpus_dir)
    stream = MixedStream(settings.corpora, small_tokenizer, 32, exclude={"bio": {"bio:7"}})
    text = small_tokenizer.decode([t for _ in range(200) for t in next(stream).input_ids.tolist()])
    assert "case 7:" not in text and "case 8:" in text


def test_gradient_accumulation_equals_one_large_batch(corpus_dir, small_tokenizer, tmp_path):
    settings = config(corpus_dir)

    def gradients(batch_size, accumulation):
        torch.manual_seed(0)
        from medstate.text.pretrain import new_or_loaded_model

        model = new_or_loaded_model(settings, small_tokenizer)
        stream = MixedStream(settings.corpora, small_tokenizer, 32, layout="padded")  # rows with unequal tokens
        train = dataclasses.replace(settings.train, grad_accumulation=accumulation, grad_clip=0.0, lr=0.0)
        trainer = Trainer(model, language_model_loss, RowBatches(stream, batch_size), train, tmp_path / "g")
        trainer._step("cpu")
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    big, accumulated = gradients(4, 1), gradients(1, 4)
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], atol=1e-6, rtol=1e-4)
