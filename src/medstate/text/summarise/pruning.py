"""`medstate text prune`: a language model with some of its blocks removed, by a list or by the measured block
influence on calibration text (`ssm.prune`), written as an ordinary checkpoint with its tokenizer and a report."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medstate.errors import MedstateError
from medstate.ssm import load_pretrained
from medstate.ssm.prune import block_influence, keep_indices, least_influential, prune_layers
from medstate.text.corpora import CorpusSource, read_documents
from medstate.text.tokenizer import TextTokenizer


def calibration_batches(
    sources: list[CorpusSource], tokenizer: TextTokenizer, tokens: int, length: int
) -> list[torch.Tensor]:
    """Rows of `length` token ids from the sources' documents in file order (end-of-text between them), `tokens`
    in all."""
    stream: list[int] = []
    for source in sources:
        for document in read_documents(source):
            stream += [tokenizer.eos_id, *tokenizer.encode(document.text)]
            if len(stream) >= tokens:
                break
        if len(stream) >= tokens:
            break
    rows = [stream[i : i + length] for i in range(0, min(tokens, len(stream)) - length + 1, length)]
    if not rows:
        raise MedstateError(f"the calibration text has fewer than {length} tokens")
    return [torch.tensor([row]) for row in rows]


def prune_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    keep: str | None = None,
    drop: int | None = None,
    calibration: list[CorpusSource] | None = None,
    tokens: int = 16_384,
    length: int = 1024,
) -> dict:
    """Prune by `keep` (a specification, see `ssm.prune.keep_indices`) or drop the `drop` least influential blocks
    measured on `calibration`; writes the model, its tokenizer and prune.json (kept blocks, influence)."""
    if (keep is None) == (drop is None):
        raise MedstateError("give either the layers to keep or the number of layers to drop")
    model = load_pretrained(model_dir)
    tokenizer = TextTokenizer.load(model_dir)
    n_layer = model.config.n_layer
    report: dict = {"source": str(model_dir), "layers_before": n_layer}
    if keep is not None:
        kept = keep_indices(keep, n_layer)
    else:
        if not calibration:
            raise MedstateError("dropping by block influence needs calibration text")
        influence = block_influence(model, calibration_batches(calibration, tokenizer, tokens, length))
        kept = least_influential(influence.tolist(), drop)
        report["influence"] = [round(float(v), 6) for v in influence]
        report["calibration_tokens"] = tokens
    pruned = prune_layers(model, kept)
    out_dir = Path(out_dir)
    pruned.save_pretrained(out_dir)
    tokenizer.save(out_dir)
    report.update(kept=kept, dropped=sorted(set(range(n_layer)) - set(kept)), layers_after=len(kept),
                  parameters_before=sum(p.numel() for p in model.parameters()),
                  parameters_after=sum(p.numel() for p in pruned.parameters()))  # fmt: skip
    (out_dir / "prune.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
