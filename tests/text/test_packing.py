"""Packing: a hand-worked row, and the logits of packed documents equal each document scored alone."""

import numpy as np
import pytest
import torch

from medstate import MedstateError
from medstate.ssm import MambaLM, SSMConfig
from medstate.text.packing import IGNORE, RowBuilder, collate, make_row, pack_documents


def test_row_by_hand():
    row = make_row([[5, 6, 7], [8, 9]], length=7, pad_id=0)
    assert row.input_ids.tolist() == [5, 6, 7, 8, 9, 0, 0]
    assert row.labels.tolist() == [IGNORE, 6, 7, IGNORE, 9, IGNORE, IGNORE]
    assert row.seq_idx.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert row.real_tokens == 5


def test_builder_carries_and_pads():
    packed = RowBuilder(4, "packed", pad_id=0)
    packed.start_row()
    packed.add([1, 2, 3])
    packed.add([4, 5, 6])
    assert not packed.has_row_room()
    assert packed.finish_row().input_ids.tolist() == [1, 2, 3, 4]
    packed.start_row()
    assert packed.finish_row().input_ids.tolist() == [5, 6, 0, 0]
    padded = RowBuilder(4, "padded", pad_id=0)
    padded.start_row()
    padded.add([1, 2, 3, 4, 5])
    assert not padded.has_row_room()
    row = padded.finish_row()
    assert row.input_ids.tolist() == [1, 2, 3, 4] and padded.carry == []  # BioMamba cuts the rest


@pytest.mark.parametrize("version", [1, 2])
def test_packed_logits_equal_each_document_alone(version):
    torch.manual_seed(0)
    config = SSMConfig(version=version, vocab_size=50, d_model=16, n_layer=2, d_state=4, head_dim=8, chunk_size=4)
    model = MambaLM(config).eval()
    rng = np.random.default_rng(0)
    documents = [rng.integers(1, 50, n).tolist() for n in (5, 9, 3, 12, 7)]
    rows = list(pack_documents(documents, length=16, pad_id=0))
    assert sum(r.real_tokens for r in rows) == sum(map(len, documents))
    batch = collate(rows)
    with torch.no_grad():
        logits = model(batch["input_ids"], seq_idx=batch["seq_idx"]).logits
        alone = [model(torch.tensor([d])).logits[0] for d in documents]
    found = []
    for r, row in enumerate(rows):
        for piece in range(int(row.seq_idx.max()) + 1):
            where = np.flatnonzero(row.seq_idx == piece)
            if row.input_ids[where].tolist() in documents:
                found.append((row.input_ids[where].tolist(), logits[r, where]))
    assert len(found) == len(documents)
    for tokens, packed_logits in found:
        torch.testing.assert_close(packed_logits, alone[documents.index(tokens)], atol=1e-5, rtol=1e-4)


def test_a_document_longer_than_a_row_is_refused_for_scoring():
    with pytest.raises(MedstateError, match="does not fit"):
        list(pack_documents([[1] * 10], length=8, pad_id=0))
