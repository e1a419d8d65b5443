"""Prompt-based classification: the log-likelihood of each answer choice as the continuation of a prompt.

Each prompt is read once: prompts of a batch are left-padded, with the padding as a segment of its own (`seq_idx`),
so that the state after the last prompt token is exactly the state of the prompt alone; each choice is then scored
from a copy of that state, one O(1) step per choice token after the first. A choice's score is the sum of the
log-probabilities of its tokens (choices are tokenized as continuations, e.g. " yes").
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from medstate.errors import MedstateError
from medstate.text.packing import left_padded
from medstate.text.tokenizer import TextTokenizer


def encode_prompt(tokenizer: TextTokenizer, prompt: str, max_tokens: int | None) -> list[int]:
    """The prompt's tokens after an end of text, cut from the left to `max_tokens` (the end holds the question)."""
    ids = [tokenizer.eos_id, *tokenizer.encode(prompt)]
    return ids[-max_tokens:] if max_tokens else ids


@torch.no_grad()
def choice_loglikelihoods(
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    prompts: Sequence[str],
    choices: Sequence[str],
    batch_size: int = 8,
    max_prompt_tokens: int | None = None,
) -> np.ndarray:
    """[len(prompts), len(choices)] summed log-probabilities of each choice after each prompt."""
    choice_ids = [tokenizer.encode(c) for c in choices]
    if any(not ids for ids in choice_ids):
        raise MedstateError(f"every answer choice needs at least one token: {list(choices)}")
    encoded = [encode_prompt(tokenizer, p, max_prompt_tokens) for p in prompts]
    order = np.argsort([len(e) for e in encoded], kind="stable")  # similar lengths together: little padding
    scores = np.zeros((len(prompts), len(choices)))
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, seq_idx = left_padded([encoded[r] for r in rows], tokenizer.eos_id)
        out = model(input_ids.to(device), seq_idx=seq_idx.to(device), return_state=True)
        first = torch.log_softmax(out.logits[:, -1].float(), -1)
        for c, ids in enumerate(choice_ids):
            total = first[:, ids[0]].double()
            state = out.state.clone() if len(ids) > 1 else None
            for previous, token in itertools.pairwise(ids):
                step = model.step(torch.full((len(rows),), previous, dtype=torch.long, device=device), state)
                state = step.state
                total += torch.log_softmax(step.logits.float(), -1)[:, token].double()
            scores[rows, c] = total.cpu().numpy()
    model.train(was_training)
    return scores
