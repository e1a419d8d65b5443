"""Text generation through the engine's recurrent steps: prompts of a batch read once (left-padded, the padding a
segment of its own), then one O(1) step per new token, greedy or sampled (temperature, top-p), ending a row at the
end-of-text token, at a stop string (cut from the output) or at `max_new_tokens`.

Beam search (`num_beams` > 1, `beam_search`) keeps the `num_beams` best partial continuations of one prompt by
summed log-probability; their recurrent states are rows of one batch, copied to the beams that continue them at each
step (`state.select`), so a step costs O(1) per beam whatever the length. A continuation that ends (end of text)
is scored by its summed log-probability / length ** `length_penalty` (its tokens, the end included); the search
stops when `num_beams` have ended and no live beam can still beat the worst of them, or at `max_new_tokens`, and
returns the best ended or live continuation. One beam is greedy decoding (it ends at its first end of text)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medstate.errors import MedstateError
from medstate.ssm.model import sample_next_token
from medstate.text.choices import encode_prompt
from medstate.text.examples import record_examples
from medstate.text.packing import left_padded
from medstate.text.rouge import rouge
from medstate.text.tokenizer import TextTokenizer


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    positions = [text.find(s) for s in stop if s and s in text]
    return (text[: min(positions)], True) if positions else (text, False)


@torch.no_grad()
def generate_texts(
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    seed: int = 0,
    max_prompt_tokens: int | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
) -> list[str]:
    """The continuation of each prompt (without the prompt, without the stop string that ended it): sampled or
    greedy, or with `num_beams` > 1 the beam search's best (prompt by prompt, cut at a stop string)."""
    if max_new_tokens < 1:
        raise MedstateError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    encoded = [encode_prompt(tokenizer, p, max_prompt_tokens) for p in prompts]
    if num_beams > 1:
        was_training = model.training
        model.eval()
        found = [beam_search(model, e, num_beams, max_new_tokens, tokenizer.eos_id, length_penalty) for e in encoded]
        model.train(was_training)
        return [_cut_at_stop(tokenizer.decode(ids), stop)[0] for ids in found]
    order = np.argsort([len(e) for e in encoded], kind="stable")
    tail = 4 * max((len(s) for s in stop), default=0) + 1
    outputs: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, seq_idx = left_padded([encoded[r] for r in rows], tokenizer.eos_id)
        out = model(input_ids.to(device), seq_idx=seq_idx.to(device), return_state=True)
        logits, state = out.logits[:, -1], out.state
        new: list[list[int]] = [[] for _ in rows]
        done = np.zeros(len(rows), dtype=bool)
        for _ in range(max_new_tokens):
            token = sample_next_token(logits, temperature, top_p, generator=generator)
            for i, t in enumerate(token.tolist()):
                if done[i]:
                    continue
                if t == tokenizer.eos_id:
                    done[i] = True
                    continue
                new[i].append(t)
                # a stop string of n characters ends within the last 4n byte-level tokens: decode only those
                done[i] = bool(stop) and _cut_at_stop(tokenizer.decode(new[i][-tail:]), stop)[1]
            if done.all():
                break
            step = model.step(token, state)
            logits, state = step.logits, step.state
        for i, r in enumerate(rows):
            outputs[r] = _cut_at_stop(tokenizer.decode(new[i]), stop)[0]
    model.train(was_training)
    return outputs


@torch.no_grad()
def beam_search(
    model: torch.nn.Module,
    prompt: Sequence[int],
    num_beams: int,
    max_new_tokens: int,
    eos_id: int | None = None,
    length_penalty: float = 1.0,
) -> list[int]:
    """The best continuation of one prompt (token ids, without the prompt, without the end-of-text token)."""
    if num_beams < 1 or max_new_tokens < 1:
        raise MedstateError(f"num_beams and max_new_tokens must be at least 1, got {num_beams}, {max_new_tokens}")
    device = next(model.parameters()).device
    out = model(torch.tensor([list(prompt)], device=device), return_state=True)
    logits, state = out.logits[:, -1], out.state
    beams: list[list[int]] = [[]]
    scores = torch.zeros(1, device=device, dtype=torch.float64)
    ended: list[tuple[float, list[int]]] = []

    def normalised(score: float, length: int) -> float:
        return score / max(length, 1) ** length_penalty

    for step in range(max_new_tokens):
        candidates = scores[:, None] + torch.log_softmax(logits.double(), dim=-1)
        top = torch.topk(candidates.flatten(), min(2 * num_beams, candidates.numel()))
        kept, origins, tokens = [], [], []
        for value, flat in zip(top.values.tolist(), top.indices.tolist()):
            origin, token = divmod(flat, candidates.shape[1])
            if token == eos_id:
                ended.append((normalised(value, step + 1), beams[origin]))
                continue
            kept.append(value)
            origins.append(origin)
            tokens.append(token)
            if len(kept) == num_beams:
                break
        beams = [beams[o] + [t] for o, t in zip(origins, tokens)]
        scores = torch.tensor(kept, device=device, dtype=torch.float64)
        ended.sort(key=lambda e: -e[0])
        ended = ended[:num_beams]
        if not kept or step == max_new_tokens - 1 or (num_beams == 1 and ended):
            break  # (one beam is greedy decoding: it ends at its first end of text)
        # the best a live beam can still reach: log-probabilities only lower its sum, and with length_penalty > 0
        # the longest length divides it most
        reachable = normalised(max(kept), max_new_tokens if length_penalty > 0 else step + 1)
        if len(ended) == num_beams and reachable <= ended[-1][0]:
            break
        stepped = model.step(torch.tensor(tokens, device=device), state.select(origins))
        logits, state = stepped.logits, stepped.state
    live = [(normalised(v, len(b)), b) for v, b in zip(scores.tolist(), beams)]
    return max(ended + live, key=lambda e: e[0])[1]


def generate_for_records(
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    prompts: Sequence[str] | None = None,
    records: str | Path | None = None,
    template: str = "{prompt}",
    reference: str | None = None,
    limit: int | None = None,
    **options,
) -> dict:
    """Outputs for literal `prompts`, or for the records of a file written through `template` (and, with a
    `reference` template, ROUGE against it). `options` go to `generate_texts`."""
    references = None
    if records is not None:
        examples = record_examples("records", records, template, reference or "")[:limit]
        prompts = [e.prompt for e in examples]
        references = [e.response for e in examples] if reference is not None else None
    outputs = generate_texts(model, tokenizer, list(prompts or []), **options)
    result: dict = {"prompts": list(prompts or []), "outputs": outputs}
    if references is not None:
        result["references"] = references
        result["rouge"] = {k: dataclasses.asdict(v) for k, v in rouge(outputs, references).items()}
    return result
