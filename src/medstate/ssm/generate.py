"""`medstate ssm generate`: a checkpoint continues a prompt given as token ids or as text with a tokenizer file."""

from __future__ import annotations

from pathlib import Path

import torch

from medstate.errors import MedstateError
from medstate.loading import parse_list
from medstate.ssm.model import load_pretrained


def continue_prompt(
    checkpoint: str | Path,
    ids: str = "",
    prompt: str = "",
    tokenizer: str | Path | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> str:
    """One prefill, then one constant-cost step per token. A text prompt (with `tokenizer`, a tokenizer.json) gives
    the decoded text and stops at the end-of-text token; comma-separated `ids` give comma-separated ids."""
    encoder = None
    if prompt:
        if tokenizer is None:
            raise MedstateError("--prompt needs --tokenizer PATH/tokenizer.json (or pass --ids)")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise MedstateError("--prompt needs the 'tokenizers' package (pip install tokenizers)") from None
        if not Path(tokenizer).is_file():
            raise MedstateError(f"tokenizer file {tokenizer} does not exist")
        encoder = Tokenizer.from_file(str(tokenizer))
        prompt_ids = encoder.encode(prompt).ids
    else:
        prompt_ids = parse_list(ids, int, "--ids")
    if not prompt_ids:
        raise MedstateError("give a prompt with --ids 1,2,3 or --prompt TEXT --tokenizer FILE")
    model = load_pretrained(checkpoint)
    if max(prompt_ids) >= model.config.vocab_size or min(prompt_ids) < 0:
        raise MedstateError(f"prompt ids must lie in [0, {model.config.vocab_size})")
    output = model.generate(
        torch.tensor([prompt_ids]),
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_token_id=model.config.eos_token_id if encoder is not None else None,
        generator=torch.Generator().manual_seed(seed),
    )[0, len(prompt_ids) :].tolist()
    return encoder.decode(output) if encoder is not None else ",".join(map(str, output))
