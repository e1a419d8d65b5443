"""Mamba backbone and causal language model with recurrent state, stepping and generation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from medstate.errors import MedstateError
from medstate.ssm.checkpoint import canonical_names, read_config, read_weights, write_checkpoint
from medstate.ssm.config import SSMConfig
from medstate.ssm.lora import has_lora, is_adapter, load_adapter, save_adapter
from medstate.ssm.loss import fused_linear_cross_entropy
from medstate.ssm.modules import MambaBlock, RMSNorm
from medstate.ssm.state import SSMState


@dataclass
class LMOutput:
    """logits: [B, T, V] (forward) or [B, V] (step); hidden_states: final normed hidden states [B, T, D] or
    [B, D]; state: the recurrent state after the last token (when asked for); loss: next-token cross-entropy
    (when labels are given)."""

    logits: torch.Tensor | None
    hidden_states: torch.Tensor
    state: SSMState | None = None
    loss: torch.Tensor | None = None


class MambaBackbone(nn.Module):
    def __init__(self, config: SSMConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(MambaBlock(config, i) for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_eps)
        self.gradient_checkpointing = False
        nn.init.normal_(self.embeddings.weight, std=config.initializer_range)
        with torch.no_grad():
            # scale residual-branch outputs by 1/sqrt(n_layer) (GPT-2 / mamba_ssm "rescale_prenorm_residual")
            for layer in self.layers:
                layer.mixer.out_proj.weight /= config.n_layer**0.5

    def _embed(self, input_ids, inputs_embeds) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        return self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds

    def empty_state(self, batch_size: int, device=None, dtype: torch.dtype | None = None) -> SSMState:
        dtype = dtype or self.embeddings.weight.dtype
        states = [layer.mixer.empty_state(batch_size, device, dtype) for layer in self.layers]
        return SSMState([c for c, _ in states], [s for _, s in states])

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        state: SSMState | None = None,
        seq_idx: torch.Tensor | None = None,
        return_state: bool = False,
    ) -> tuple[torch.Tensor, SSMState | None]:
        hidden = self._embed(input_ids, inputs_embeds)
        if seq_idx is not None and seq_idx.shape != hidden.shape[:2]:
            raise ValueError(f"seq_idx shape {tuple(seq_idx.shape)} != batch x time {tuple(hidden.shape[:2])}")
        new_conv, new_ssm = [], []
        for i, layer in enumerate(self.layers):
            layer_state = None if state is None else (state.conv[i], state.ssm[i])
            if self.gradient_checkpointing and torch.is_grad_enabled():
                hidden, (conv, ssm) = checkpoint(layer, hidden, layer_state, seq_idx, use_reentrant=False)
            else:
                hidden, (conv, ssm) = layer(hidden, layer_state, seq_idx)
            new_conv.append(conv)
            new_ssm.append(ssm)
        hidden = self.norm_f(hidden.to(self.norm_f.weight.dtype))
        return hidden, (SSMState(new_conv, new_ssm) if return_state else None)

    def step(
        self, input_ids: torch.Tensor | None, state: SSMState, inputs_embeds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, SSMState]:
        hidden = self._embed(input_ids, inputs_embeds)
        new_conv, new_ssm = [], []
        for i, layer in enumerate(self.layers):
            hidden, (conv, ssm) = layer.step(hidden, (state.conv[i], state.ssm[i]))
            new_conv.append(conv)
            new_ssm.append(ssm)
        return self.norm_f(hidden.to(self.norm_f.weight.dtype)), SSMState(new_conv, new_ssm)


class MambaLM(nn.Module):
    """Causal language model: embeddings → Mamba blocks → RMSNorm → (tied) vocabulary head."""

    def __init__(self, config: SSMConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = MambaBackbone(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    # ----- sequences ------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        state: SSMState | None = None,
        seq_idx: torch.Tensor | None = None,
        return_state: bool = False,
        labels: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> LMOutput:
        """Whole sequences [B, T], optionally continuing from `state`.

        seq_idx [B, T] (non-decreasing per row) packs several sequences into one row: no information crosses
        a change of seq_idx. labels [B, T] gives the next-token loss (labels are shifted here; -100 = ignore;
        set the first label of each packed sequence to -100). With labels and return_logits=False the loss is
        fused with the vocabulary projection in chunks (same value and gradients, a fraction of the memory)
        and no logits are returned."""
        hidden, new_state = self.backbone(input_ids, inputs_embeds, state, seq_idx, return_state)
        targets = None if labels is None else F.pad(labels[:, 1:], (0, 1), value=-100).flatten()
        if labels is not None and not return_logits and type(self.lm_head) is nn.Linear:  # (not when adapted)
            loss = fused_linear_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, targets)
            return LMOutput(None, hidden, new_state, loss)
        logits = self.lm_head(hidden.to(self.lm_head.weight.dtype))
        loss = None
        if targets is not None:
            # the labels are shifted, not the logits: slicing [B, T, V] logits would copy them
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=-100)
        return LMOutput(logits, hidden, new_state, loss)

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        state: SSMState | None = None,
        segment_length: int = 1024,
        return_hidden_states: bool = True,
    ) -> LMOutput:
        """Consume a long history segment by segment (memory bounded by one segment) and return the state.

        Returns the final hidden states of every position (when asked), the logits of the last position only,
        and the state after the last token. Equal to `forward` up to floating-point reassociation."""
        source = input_ids if input_ids is not None else inputs_embeds
        hidden_parts = []
        hidden = None
        for start in range(0, source.shape[1], segment_length):
            part = source[:, start : start + segment_length]
            if input_ids is not None:
                hidden, state = self.backbone(part, None, state, None, True)
            else:
                hidden, state = self.backbone(None, part, state, None, True)
            if return_hidden_states:
                hidden_parts.append(hidden)
        logits = self.lm_head(hidden[:, -1].to(self.lm_head.weight.dtype))
        all_hidden = torch.cat(hidden_parts, dim=1) if return_hidden_states else hidden[:, -1]
        return LMOutput(logits, all_hidden, state)

    # ----- one token at a time ------------------------------------------------------------------------
    def empty_state(self, batch_size: int, device=None, dtype: torch.dtype | None = None) -> SSMState:
        return self.backbone.empty_state(batch_size, device, dtype)

    def step(
        self,
        input_ids: torch.Tensor | None = None,
        state: SSMState | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
    ) -> LMOutput:
        """One token per row: input_ids [B] (or inputs_embeds [B, D]) → logits [B, V] and the new state.
        Cost and memory do not depend on how many tokens the state has seen."""
        source = input_ids if input_ids is not None else inputs_embeds
        if state is None:
            state = self.empty_state(source.shape[0], source.device)
        hidden, state = self.backbone.step(input_ids, state, inputs_embeds)
        return LMOutput(self.lm_head(hidden.to(self.lm_head.weight.dtype)), hidden, state)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        state: SSMState | None = None,
    ) -> torch.Tensor:
        """One prefill, then one O(1) step per new token. Greedy when temperature is 0. Rows that produced
        `eos_token_id` keep emitting it; generation stops when all rows have. Returns [B, T + new]."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError("input_ids must be [batch, length] with length >= 1")
        hidden, state = self.backbone(input_ids, None, state, None, True)
        logits = self.lm_head(hidden[:, -1].to(self.lm_head.weight.dtype))
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new_tokens = []
        for i in range(max_new_tokens):
            token = sample_next_token(logits, temperature, top_p, top_k, generator)
            if eos_token_id is not None:
                token = token.masked_fill(finished, eos_token_id)
                finished |= token == eos_token_id
            new_tokens.append(token)
            if i == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
                break
            out = self.step(token, state)
            logits, state = out.logits, out.state
        if not new_tokens:
            return input_ids
        return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)

    # ----- checkpoints ----------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        return save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> MambaLM:
        return load_pretrained(path, **kwargs)


def load_pretrained(
    path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> MambaLM:
    """Load a local Mamba / Mamba-2 checkpoint directory (`ssm.checkpoint`'s layouts) into a `MambaLM` (eval mode).
    A LoRA adapter directory (PEFT's format) loads its base model with the adapters on it."""
    directory = Path(path)
    if not directory.is_dir():
        raise MedstateError(f"checkpoint directory {directory} does not exist")
    if is_adapter(directory):
        return load_adapter(directory, lambda base: load_pretrained(base, dtype, device)).eval()
    config = read_config(directory)
    weights = canonical_names(read_weights(directory))
    embedding = weights.get("backbone.embeddings.weight")
    if embedding is None:
        raise MedstateError(f"{directory}: weights have no embedding matrix (backbone.embeddings.weight)")
    config.vocab_size = embedding.shape[0]
    if config.tie_embeddings:
        weights.pop("lm_head.weight", None)
    elif "lm_head.weight" not in weights:
        raise MedstateError(f"{directory}: untied embeddings but no lm_head.weight in the weights")
    with torch.device("meta"):
        model = MambaLM(config)
    incompatible = model.load_state_dict(weights, strict=False, assign=True)
    missing = [k for k in incompatible.missing_keys if not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or incompatible.unexpected_keys:
        raise MedstateError(
            f"{directory}: weights do not match the config (missing {missing[:5]}, "
            f"unexpected {incompatible.unexpected_keys[:5]})"
        )
    if config.tie_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    return model.to(device=device, dtype=dtype).eval()


def save_pretrained(model: MambaLM, directory: str | Path) -> Path:
    """Write config.json + model.safetensors in the Hugging Face layout; a model with LoRA adapters writes the
    adapters (PEFT's format, naming its base model)."""
    if has_lora(model):
        return save_adapter(model, directory)
    config = model.config.to_hf_dict()
    config["dtype"] = str(model.backbone.embeddings.weight.dtype).removeprefix("torch.")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return write_checkpoint(directory, config, state)


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] → token ids [B]: argmax at temperature 0, else top-k / nucleus (top-p) sampling."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise MedstateError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the top token is always kept)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, -torch.inf)
        logits = torch.full_like(logits, -torch.inf).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
