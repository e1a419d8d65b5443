"""The GPT-2-style Transformer baseline (`text.transformer`) against Hugging Face's GPT2LMHeadModel on the same
weights: packed rows, the fused loss, checkpoints, answer-slot scoring from a copied key/value cache, pretraining."""

import dataclasses

import pytest
import torch

from medstate import MedstateError
from medstate.text.models import load_language_model
from medstate.text.notes.classify import Criterion, branched_slot_logits, document_budget, question_ids
from medstate.text.transformer import TransformerLM, TransformerSizes

transformers = pytest.importorskip("transformers")


@pytest.fixture
def saved(small_tokenizer, tmp_path):
    """A random TransformerLM saved in the HF layout, and HF's own model loaded from it."""
    torch.manual_seed(0)
    model = TransformerLM(TransformerSizes(d_model=32, n_layer=2, n_head=4, n_positions=160), len(small_tokenizer))
    model.save_pretrained(tmp_path / "gpt2")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2", attn_implementation="eager").eval()
    return load_language_model(tmp_path / "gpt2"), hf


def test_checkpoint_is_hf_gpt2_with_the_same_logits(saved):
    ours, hf = saved
    assert isinstance(ours, TransformerLM) and not ours.training
    ids = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, hf(ids).logits, atol=1e-5)
        # the fused loss (no logits) is HF's mean next-token cross-entropy
        assert float(ours(ids, labels=ids, return_logits=False).loss) == pytest.approx(
            float(hf(ids, labels=ids).loss), abs=1e-5
        )


def test_packed_rows_are_separate_documents(saved):
    ours, hf = saved
    generator = torch.Generator().manual_seed(2)
    pieces = [torch.randint(0, ours.config.vocab_size, (n,), generator=generator) for n in (7, 12, 5)]
    row = torch.cat(pieces)[None]
    seq_idx = torch.cat([torch.full((len(p),), i) for i, p in enumerate(pieces)])[None]
    with torch.no_grad():
        packed = ours(row, seq_idx=seq_idx).logits[0]
        alone = torch.cat([hf(p[None]).logits[0] for p in pieces])  # each piece from position 0, seeing only itself
    assert torch.allclose(packed, alone, atol=1e-5)


def test_branched_answer_slots_equal_hf_reading_each_prompt(saved, small_tokenizer):
    ours, hf = saved
    document = "the patient was given aspirin for chest pain " * 12
    criteria = [Criterion("a", "was aspirin given"), Criterion("b", "chest pain"), Criterion("c", "discharged home?")]
    with torch.no_grad():
        branched = branched_slot_logits(ours, small_tokenizer, document, criteria)
        reversed_ = branched_slot_logits(ours, small_tokenizer, document, criteria[::-1])
        budget = document_budget(ours, question_ids(small_tokenizer, criteria), None)
        expected = []
        for c in criteria:
            prompt = [small_tokenizer.eos_id, *small_tokenizer.encode(document)]
            prompt = prompt[-budget:] + small_tokenizer.encode(f"\n\nQuestion: {c.question}\nAnswer:")
            expected.append(hf(torch.tensor([prompt])).logits[0, -1])
    assert torch.allclose(branched, torch.stack(expected), atol=1e-4)
    assert torch.allclose(reversed_.flip(0), branched, atol=1e-5)


def test_learned_positions_bound_the_input(saved, small_tokenizer):
    ours, _ = saved
    questions = question_ids(small_tokenizer, [Criterion("a", "was aspirin given")])
    budget = document_budget(ours, questions, None)
    assert budget == 160 - len(questions[0]) and document_budget(ours, questions, 50) == 50
    with pytest.raises(MedstateError, match="160"):
        ours(torch.zeros(1, 161, dtype=torch.long))


def test_pretraining_a_transformer_with_the_same_recipe(pretrain_config, small_tokenizer, tmp_path):
    from medstate.text.biomed.pretrain import pretrain
    from medstate.text.corpora import read_documents
    from medstate.text.evaluate import score_documents
    from medstate.train.param_groups import depth

    config = pretrain_config(max_steps=4, eval_every=2, save_every=2)
    config = dataclasses.replace(config, model={"architecture": "gpt2", "d_model": 16, "n_layer": 2, "n_head": 2,
                                                "n_positions": 128})  # fmt: skip
    result = pretrain(config, tmp_path / "run")
    hf = transformers.GPT2LMHeadModel.from_pretrained(result.model_dir).eval()
    documents = list(read_documents(config.validation[0]))
    scores = score_documents(load_language_model(result.model_dir), small_tokenizer, documents, length=64)
    for document, nll in zip(documents, scores.nll):
        ids = torch.tensor([[small_tokenizer.eos_id, *small_tokenizer.encode(document.text)]])
        with torch.no_grad():
            expected = float(hf(ids, labels=ids).loss) * (ids.shape[1] - 1)
        assert nll == pytest.approx(expected, rel=1e-4)
    reported = result.metrics["validation"]["heldout"]["nats_per_token"]["value"]
    assert reported == pytest.approx(scores.nll.sum() / scores.tokens.sum(), rel=1e-4)
    # layer-wise decay knows GPT-2's names: embeddings lowest, block i at i + 1, the final norm on top
    names = ("wte.weight", "wpe.weight", "h.1.mlp.c_fc.weight", "ln_f.weight")
    assert [depth(f"backbone.gpt2.{n}", 2) for n in names] == [0, 0, 2, 3]


def test_long_documents_are_scored_in_windows_within_the_positions(saved, small_tokenizer):
    from medstate.text.corpora import Document
    from medstate.text.evaluate import score_documents

    ours, hf = saved
    text = " ".join(["the patient was given aspirin for chest pain"] * 7)
    ids = [small_tokenizer.eos_id, *small_tokenizer.encode(text)]
    assert 100 < len(ids) <= 160
    # segments of 50: every window holds the whole history (at most 110 earlier tokens fit): HF on the whole text
    (nll,) = score_documents(ours, small_tokenizer, [Document("d", text)], length=50).nll
    with torch.no_grad():
        whole = float(hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss) * (len(ids) - 1)
    assert nll == pytest.approx(whole, rel=1e-5)
    with pytest.raises(MedstateError, match="below"):
        score_documents(ours, small_tokenizer, [Document("d", text * 3)], length=160)
