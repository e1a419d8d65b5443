"""LoRA finetuning, merging and pruning through the command line: `text sft --lora` trains adapters only and writes
them in PEFT's format beside the merged model; `text merge` and `text prune` write ordinary checkpoints."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from medstate.cli import app
from medstate.ssm import MambaLM, SSMConfig, load_pretrained
from medstate.text.generate import generate_texts
from medstate.text.tokenizer import padded_vocab_size

runner = CliRunner()


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_lora_sft_merge_and_prune(small_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = SSMConfig(version=2, vocab_size=padded_vocab_size(len(small_tokenizer)), d_model=32, n_layer=3,
                       d_state=8, head_dim=8, chunk_size=8)  # fmt: skip
    MambaLM(config).save_pretrained(tmp_path / "init")
    small_tokenizer.save(tmp_path / "init")
    before = load_file(tmp_path / "init/model.safetensors")
    pairs = [("aspirin", "chest pain"), ("heparin", "platelet count"), ("scan", "no acute findings")] * 10
    (tmp_path / "qa.jsonl").write_text(
        "\n".join(json.dumps({"id": i, "q": q, "a": a}) for i, (q, a) in enumerate(pairs))
    )
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump({
        "init": "init", "seq_len": 64, "batch_size": 4, "validation_fraction": 0.0,
        "tasks": [{"name": "qa", "kind": "records", "path": "qa.jsonl", "prompt": "drug {q} for", "response": " {a}",
                   "id_field": "id"}],
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "targets": ["in_proj", "out_proj"]},
        "train": {"max_steps": 80, "lr": 0.02, "warmup_steps": 5},
    }))  # fmt: skip
    _invoke("text", "sft", tmp_path / "sft.yaml", tmp_path / "run", "--lora")
    adapter = tmp_path / "run/adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    assert all("lora_" in k for k in load_file(adapter / "adapter_model.safetensors"))
    assert load_file(tmp_path / "init/model.safetensors").keys() == before.keys()  # the base is never written
    assert all(torch.equal(t, load_file(tmp_path / "init/model.safetensors")[k]) for k, t in before.items())
    merged = load_pretrained(tmp_path / "run/model")
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    outputs = generate_texts(merged, small_tokenizer, ["drug aspirin for", "drug heparin for"], max_new_tokens=24)
    assert outputs == [" chest pain", " platelet count"]  # learned through the adapters alone
    # merging the adapter directory again gives the same model; HF transformers reads it
    _invoke("text", "merge", adapter, tmp_path / "merged")
    again = load_file(tmp_path / "merged/model.safetensors")
    assert all(
        torch.allclose(t, again[k], atol=1e-6) for k, t in load_file(tmp_path / "run/model/model.safetensors").items()
    )
    ids = torch.tensor([small_tokenizer.encode("drug scan for")])
    hf = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, merged(ids).logits, atol=1e-4)
    # prune the merged model: by a list, and by influence on calibration text
    _invoke("text", "prune", tmp_path / "merged", tmp_path / "pruned", "--keep", "first:2")
    assert load_pretrained(tmp_path / "pruned").config.n_layer == 2
    (tmp_path / "calibration.yaml").write_text("corpora: [{name: qa, path: qa.jsonl, text_fields: [q, a]}]\n")
    _invoke("text", "prune", tmp_path / "merged", tmp_path / "pruned2", "--drop", "1", "--calibration",
            tmp_path / "calibration.yaml", "--tokens", "64", "--length", "16")  # fmt: skip
    report = json.loads((tmp_path / "pruned2/prune.json").read_text())
    weakest = min(range(3), key=lambda i: (report["influence"][i], -i))
    assert report["dropped"] == [weakest] and report["layers_after"] == 2
    assert runner.invoke(app, ["text", "prune", str(tmp_path / "merged"), str(tmp_path / "p3")]).exit_code == 2
