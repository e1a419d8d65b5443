"""A GPT-2-style Transformer language model with the interface of `MambaLM`: the same-size baseline of the text
recipes (pretraining, prompt-based classification), trained and scored by the same code.

It is Hugging Face's `GPT2Model` (attention through torch's scaled-dot-product attention) with a vocabulary head tied
to its token embeddings, checkpointed in the Hugging Face layout (`GPT2LMHeadModel` loads it). What differs from
the Mamba models, and what the recipes must know:

- its "state" after reading a prefix is the key/value cache of every layer (`KVState`), which grows with every token
  read (a Mamba state has a fixed size); `select` copies it per branch, so classification reads a document once and
  asks each question from a copy, as with Mamba;
- positions are learned up to `n_positions`: a sequence (with what the state has read) longer than that is an
  error, never silently wrapped;
- packed rows (`seq_idx`) get a block-diagonal causal mask and positions restarting at each piece, so no attention
  crosses from one document to the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medstate.errors import MedstateError
from medstate.ssm.loss import fused_linear_cross_entropy
from medstate.ssm.model import LMOutput


@dataclass
class TransformerSizes:
    """What `model:` says in a pretraining config with `architecture: gpt2`."""

    architecture: str = "gpt2"
    d_model: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_positions: int = 4096
    dropout: float = 0.0


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MedstateError(
            "the Transformer baseline needs Hugging Face transformers: pip install 'medstate[baselines]'"
        ) from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


class KVState:
    """The key/value cache of every layer after a prefix: [B, heads, tokens, head size] keys and values."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def select(self, index) -> KVState:
        """Rows `index` of the batch (repeats allowed): one branch per entry. Differentiable."""
        index = torch.as_tensor(index, device=self.keys[0].device)
        return KVState([k.index_select(0, index) for k in self.keys], [v.index_select(0, index) for v in self.values])

    def cache(self):
        cache = _transformers().DynamicCache()
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            cache.update(k, v, layer)
        return cache

    @classmethod
    def of(cls, cache) -> KVState:
        return cls([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers])


class TransformerBackbone(nn.Module):
    """`GPT2Model` called as `MambaBackbone` is: (input_ids, inputs_embeds, state, seq_idx, return_state)."""

    def __init__(self, gpt2: nn.Module):
        super().__init__()
        self.gpt2 = gpt2
        self.gradient_checkpointing = False

    @property
    def embeddings(self) -> nn.Embedding:
        return self.gpt2.wte

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        state: KVState | None = None,
        seq_idx: torch.Tensor | None = None,
        return_state: bool = False,
    ) -> tuple[torch.Tensor, KVState | None]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        device = self.gpt2.wte.weight.device
        past = 0 if state is None else state.length
        limit = self.gpt2.config.n_positions
        if past + length > limit:
            raise MedstateError(
                f"this Transformer has learned positions up to {limit} tokens; it was given {past + length}"
            )
        if seq_idx is not None and state is not None:
            raise ValueError("packed rows (seq_idx) cannot continue from a state")
        mask = None
        if seq_idx is not None:
            same = seq_idx[:, :, None] == seq_idx[:, None, :]
            mask = (same & torch.ones(length, length, dtype=torch.bool, device=device).tril())[:, None]
            starts = torch.cat([torch.ones_like(seq_idx[:, :1]), (seq_idx[:, 1:] != seq_idx[:, :-1]).long()], 1)
            first = torch.cummax(torch.where(starts.bool(), torch.arange(length, device=device), 0), dim=1).values
            positions = torch.arange(length, device=device) - first
        else:
            positions = torch.arange(past, past + length, device=device).expand(batch, length)
        self.gpt2.gradient_checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()
        out = self.gpt2(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=None if state is None else state.cache(),
            use_cache=return_state,
        )
        return out.last_hidden_state, (KVState.of(out.past_key_values) if return_state else None)


class TransformerLM(nn.Module):
    """Causal language model: GPT-2 blocks → final LayerNorm → vocabulary head tied to the token embeddings."""

    def __init__(self, sizes: TransformerSizes | None = None, vocab_size: int = 0, *, hf_model=None):
        super().__init__()
        transformers = _transformers()
        if hf_model is None:
            if sizes is None or sizes.architecture != "gpt2":
                raise MedstateError("the Transformer model's architecture must be gpt2")
            if sizes.d_model % sizes.n_head:
                raise MedstateError(f"d_model {sizes.d_model} must be a multiple of n_head {sizes.n_head}")
            config = transformers.GPT2Config(
                vocab_size=vocab_size, n_embd=sizes.d_model, n_layer=sizes.n_layer, n_head=sizes.n_head,
                n_positions=sizes.n_positions, resid_pdrop=sizes.dropout, embd_pdrop=sizes.dropout,
                attn_pdrop=sizes.dropout, bos_token_id=None, eos_token_id=None, tie_word_embeddings=True,
            )  # fmt: skip
            config._attn_implementation = "sdpa"
            hf_model = transformers.GPT2LMHeadModel(config)
        self.config = hf_model.config
        self.backbone = TransformerBackbone(hf_model.transformer)
        self.lm_head = nn.Linear(self.config.n_embd, self.config.vocab_size, bias=False)
        self.lm_head.weight = self.backbone.gpt2.wte.weight

    @property
    def max_positions(self) -> int:
        return self.config.n_positions

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        state: KVState | None = None,
        seq_idx: torch.Tensor | None = None,
        return_state: bool = False,
        labels: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> LMOutput:
        """As `MambaLM.forward` (labels shifted here, -100 ignored; return_logits=False fuses the loss)."""
        hidden, new_state = self.backbone(input_ids, inputs_embeds, state, seq_idx, return_state)
        targets = None if labels is None else F.pad(labels[:, 1:], (0, 1), value=-100).flatten()
        if labels is not None and not return_logits:
            return LMOutput(
                None, hidden, new_state, fused_linear_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, targets)
            )
        logits = self.lm_head(hidden)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=-100)
        return LMOutput(logits, hidden, new_state, loss)

    def save_pretrained(self, directory: str | Path) -> Path:
        """config.json + model.safetensors that `transformers.GPT2LMHeadModel.from_pretrained` loads."""
        transformers = _transformers()
        with torch.device("meta"):
            hf_model = transformers.GPT2LMHeadModel(self.config)
        hf_model.transformer = self.backbone.gpt2
        hf_model.lm_head = self.lm_head
        hf_model.save_pretrained(directory)
        return Path(directory)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu") -> TransformerLM:
        transformers = _transformers()
        hf_model = transformers.GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
        return cls(hf_model=hf_model).to(device).eval()
