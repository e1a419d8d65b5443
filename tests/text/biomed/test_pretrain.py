"""The continued-pretraining recipe: a run killed after a checkpoint resumes to the same weights, EMA, data position
and log as an uninterrupted one; gradient accumulation equals one large batch; held-out text never reaches
training; the exported model is the best validated EMA model."""

import dataclasses
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from medstate.text.biomed.pretrain import RowBatches, pretrain
from medstate.text.mixing import MixedStream
from medstate.text.runs import language_model_loss
from medstate.train.loop import Trainer


class Killed(Exception):
    pass


def test_killed_run_resumes_exactly(pretrain_config, tmp_path):
    whole = pretrain(pretrain_config(), tmp_path / "whole")

    def kill_after_checkpoint(step, total, loss):
        if step == 6:  # the checkpoint of step 4 is on disk, steps 5 and 6 are lost
            raise Killed

    with pytest.raises(Killed):
        pretrain(pretrain_config(), tmp_path / "killed", kill_after_checkpoint)
    resumed = pretrain(pretrain_config(), tmp_path / "killed")
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


def test_exported_model_is_the_best_validated_ema_model(pretrain_config, tmp_path):
    result = pretrain(pretrain_config(), tmp_path / "run")
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


def test_held_out_text_never_reaches_training(pretrain_config, tmp_path, small_tokenizer):
    result = pretrain(pretrain_config(max_steps=2), tmp_path / "run")
    report = json.loads((result.run_dir / "contamination.json").read_text())
    assert report["removed"] == {"bio": {"ngram": 1}}
    assert report["documents"] == [{"source": "bio", "id": "bio:7", "matches": "heldout:100"}]
    settings = pretrain_config()
    stream = MixedStream(settings.corpora, small_tokenizer, 32, exclude={"bio": {"bio:7"}})
    text = small_tokenizer.decode([t for _ in range(200) for t in next(stream).input_ids.tolist()])
    assert "case 7:" not in text and "case 8:" in text


def test_gradient_accumulation_equals_one_large_batch(pretrain_config, small_tokenizer, tmp_path):
    settings = pretrain_config()

    def gradients(batch_size, accumulation):
        torch.manual_seed(0)
        from medstate.text.biomed.pretrain import new_or_loaded_model

        model = new_or_loaded_model(settings, small_tokenizer)
        stream = MixedStream(settings.corpora, small_tokenizer, 32, layout="padded")  # rows with unequal tokens
        train = dataclasses.replace(settings.train, grad_accumulation=accumulation, grad_clip=0.0, lr=0.0)
        trainer = Trainer(model, language_model_loss, RowBatches(stream, batch_size), train, tmp_path / "g")
        trainer._step("cpu")
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    big, accumulated = gradients(4, 1), gradients(1, 4)
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], atol=1e-6, rtol=1e-4)


def test_config_paths_are_relative_to_the_file(tmp_path):
    from medstate.text.biomed.pretrain import PretrainConfig
    from medstate.text.biomed.sft import SFTConfig
    from medstate.text.corpora import read_corpus_list

    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "p.yaml").write_text(
        "tokenizer: ../tok\ninit: model\ncorpora: [{name: a, path: data/a.jsonl}]\n"
        "validation: [{name: v, path: /abs/v.jsonl}]\n"
    )
    config = PretrainConfig.read(folder / "p.yaml")
    assert config.tokenizer == str(tmp_path / "tok") and config.init == str(folder / "model")
    assert config.corpora[0].path == str(folder / "data/a.jsonl") and config.validation[0].path == "/abs/v.jsonl"
    (folder / "s.yaml").write_text("init: m\ntasks: [{name: q, kind: pubmedqa, path: ../qa}]\npubmedqa_test: ../qa\n")
    sft = SFTConfig.read(folder / "s.yaml")
    assert (sft.init, sft.tasks[0].path, sft.pubmedqa_test, sft.tokenizer) == (
        str(folder / "m"),
        str(tmp_path / "qa"),
        str(tmp_path / "qa"),
        None,
    )
    (folder / "c.yaml").write_text("corpora: [{name: a, path: a.jsonl}]\n")
    assert read_corpus_list(folder / "c.yaml")[0].path == str(folder / "a.jsonl")
