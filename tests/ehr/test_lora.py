"""LoRA finetuning of EhrMamba: adapters on the projections, the classifier trained whole, the base frozen; the
run's checkpoints are adapters that load and merge to the model whose weights are W + (alpha / r) B A, written out
here from the adapter file."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from medstate import MedstateError
from medstate.cli import app
from medstate.ehr.batching import collate
from medstate.ehr.model import EhrMamba
from medstate.ehr.training import load_model, predict
from medstate.ssm.lora import LoraSettings, add_lora
from tests.ehr.conftest import inputs_frame

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def pretrained(prepared, tmp_path_factory):
    run = tmp_path_factory.mktemp("pretrain")
    command = [sys.executable, "-m", "medstate.cli", "ehr", "pretrain", str(prepared), str(run), "--d-model", "16",
               "--n-layer", "2", "--max-steps", "2", "--token-budget", "1024", "--ssm-version", "2"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    return run / "checkpoints" / "last"


def _batch(prepared):

    from medstate.ehr.sequences import ARRAYS

    rows = inputs_frame(prepared, "finetune").head(6).iter_rows(named=True)
    return collate([{name: row[name] for name in ARRAYS} for row in rows])


def test_every_adapter_and_the_classifier_get_gradients(pretrained, prepared):
    model = load_model(pretrained).train()
    model = add_lora(model, LoraSettings(["in_proj", "out_proj"], rank=2, dropout=0.0, modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if "lora_" in n or n.startswith("classifier.")}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    batch = _batch(prepared)
    model(batch, ends=batch["ends"]).class_logits.sum().backward()
    silent = [n for n in trainable if model.get_parameter(n).grad is None or not model.get_parameter(n).grad.any()]
    assert not silent
    frozen = [n for n, p in model.named_parameters() if n not in trainable and p.grad is not None]
    assert not frozen


def test_modules_to_save_are_checked(pretrained):
    model = load_model(pretrained)
    with pytest.raises(MedstateError, match="'head' matches no module"):
        add_lora(model, LoraSettings(["in_proj"], modules_to_save=["head"]))
    with pytest.raises(MedstateError, match="both adapted by LoRA and in modules_to_save"):
        add_lora(model, LoraSettings(["classifier.1"], modules_to_save=["classifier"]))
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_lora_finetune_run_merges_to_the_written_out_weights(pretrained, prepared, tmp_path):
    runner = CliRunner()
    run = tmp_path / "lora"
    args = ["ehr", "finetune", str(prepared), str(run), "--init", str(pretrained), "--max-steps", "3",
            "--token-budget", "1024", "--lr", "0.01", "--lora", "--lora-rank", "4", "--lora-alpha", "8"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    adapter = run / "checkpoints" / "last"
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()

    # the model the adapters define, written from the files: W + (alpha / r) B A on each adapted projection
    base = EhrMamba.from_pretrained(pretrained)
    saved = load_file(adapter / "adapter_model.safetensors")
    saved = {k.removeprefix("base_model.model."): v for k, v in saved.items()}
    state = base.state_dict()
    adapted = sorted(k.removesuffix(".lora_A.weight") for k in saved if k.endswith(".lora_A.weight"))
    assert len(adapted) == 4 and all(k.endswith(("in_proj", "out_proj")) for k in adapted)
    for name in adapted:
        delta = saved[f"{name}.lora_B.weight"] @ saved[f"{name}.lora_A.weight"]
        assert delta.abs().max() > 0  # the adapters trained
        state[f"{name}.weight"] = state[f"{name}.weight"] + (8 / 4) * delta
    assert not torch.equal(saved["classifier.1.weight"], state["classifier.1.weight"])  # the classifier trained
    state.update({k: v for k, v in saved.items() if k.startswith("classifier.")})
    expected = EhrMamba(base.config)
    expected.load_state_dict(state)

    reloaded = load_model(adapter)
    frozen = {k.replace(".base_layer", ""): v for k, v in reloaded.state_dict().items() if "lora_" not in k}
    changed = [k for k, v in base.state_dict().items() if not k.startswith("classifier.") and not torch.equal(
        frozen[k], v)]  # fmt: skip
    assert not changed  # the base was frozen

    merged = tmp_path / "merged"
    result = runner.invoke(app, ["ehr", "merge", str(adapter), str(merged)])
    assert result.exit_code == 0, result.output
    plain = EhrMamba.from_pretrained(merged)
    assert (merged / "model.safetensors").is_file() and (merged / "vocab.json").is_file()
    want = predict(expected, prepared, "held_out")["y_score"].to_numpy()
    for model in (reloaded, plain):
        assert predict(model, prepared, "held_out")["y_score"].to_numpy() == pytest.approx(want, abs=1e-5)


def test_lora_needs_init_and_a_matching_resume(pretrained, prepared, tmp_path):
    runner = CliRunner()
    base = ["ehr", "finetune", str(prepared), str(tmp_path / "run"), "--token-budget", "1024"]
    result = runner.invoke(app, [*base, "--lora", "--max-steps", "1"])
    assert result.exit_code == 2 and "give --init" in result.output
    result = runner.invoke(app, [*base, "--init", str(pretrained), "--max-steps", "1", "--save-every", "1"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*base, "--init", str(pretrained), "--max-steps", "2", "--lora"])
    assert result.exit_code == 2 and "has no LoRA adapters" in result.output
