"""The EhrMamba model: EHR embeddings → medstate Mamba backbone → next-event head and task classifier.

Embeddings (after EhrMamba / CEHR-BERT): the concept embedding is concatenated with learned sinusoidal features of
age (years) and time (years since the first event), projected back to d_model, and summed with token-type,
visit-order and visit-segment embeddings; then LayerNorm and dropout. The next-event head is tied to the concept
embedding. The classifier reads the hidden state of a sample's last token: in prompted finetuning that is the task
token, so one head serves every task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medstate.ehr.checkpoints import CheckpointMixin
from medstate.ehr.sequences import N_TOKEN_TYPES, YEAR_DAYS
from medstate.ssm import MambaLM, SSMConfig, SSMState


@dataclass
class EhrMambaConfig:
    vocab_size: int
    d_model: int = 128
    n_layer: int = 4
    ssm_version: int = 1  # Mamba-1 as in the EhrMamba paper; 2 selects the SSD mixer
    d_state: int = 16
    head_dim: int = 32  # Mamba-2 only
    time_features: int = 16
    max_visit_order: int = 512
    dropout: float = 0.1

    def ssm_config(self) -> SSMConfig:
        return SSMConfig(
            version=self.ssm_version,
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            n_layer=self.n_layer,
            d_state=self.d_state,
            head_dim=self.head_dim,
            chunk_size=64,
            pad_token_id=0,
        )


def embedding_config(config) -> EhrMambaConfig:
    """The embedding layer's settings for a baseline config that shares EhrMamba's embeddings."""
    return EhrMambaConfig(
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        time_features=config.time_features,
        max_visit_order=config.max_visit_order,
        dropout=config.dropout,
    )


class TimeFeatures(nn.Module):
    """Learned sinusoidal features of a scalar (Time2Vec): one linear feature, the rest sin(w t + b)."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))
        self.bias = nn.Parameter(torch.randn(n))

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        x = value.unsqueeze(-1) * self.weight + self.bias
        return torch.cat([x[..., :1], torch.sin(x[..., 1:])], dim=-1)


class EhrEmbeddings(nn.Module):
    def __init__(self, config: EhrMambaConfig, concept: nn.Embedding):
        super().__init__()
        self.config = config
        self.concept = concept
        self.age = TimeFeatures(config.time_features)
        self.time = TimeFeatures(config.time_features)
        self.project = nn.Linear(config.d_model + 2 * config.time_features, config.d_model)
        self.token_type = nn.Embedding(N_TOKEN_TYPES, config.d_model)
        self.visit_order = nn.Embedding(config.max_visit_order, config.d_model)
        self.visit_segment = nn.Embedding(3, config.d_model)
        self.norm = nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        features = torch.cat(
            [
                self.concept(batch["input_ids"]),
                self.age(batch["ages"]),
                self.time(batch["times"] / YEAR_DAYS),
            ],
            dim=-1,
        )
        order = batch["visit_orders"].clamp(max=self.config.max_visit_order - 1)
        hidden = (
            self.project(features)
            + self.token_type(batch["token_types"])
            + self.visit_order(order)
            + self.visit_segment(batch["visit_segments"])
        )
        return self.dropout(self.norm(hidden))


@dataclass
class EhrOutput:
    hidden_states: torch.Tensor
    lm_loss: torch.Tensor | None = None
    class_logits: torch.Tensor | None = None  # one logit per sample end


class EhrMamba(CheckpointMixin, nn.Module):
    MODEL_TYPE = "medstate-ehrmamba"
    CONFIG_CLASS = EhrMambaConfig

    def __init__(self, config: EhrMambaConfig):
        super().__init__()
        self.config = config
        self.lm = MambaLM(config.ssm_config())
        self.embeddings = EhrEmbeddings(config, self.lm.backbone.embeddings)
        self.classifier = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.d_model, 1))

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        lm_targets: torch.Tensor | None = None,
        ends: torch.Tensor | None = None,
    ) -> EhrOutput:
        """batch: the token arrays [B, T] (and `seq_idx` for packed rows). lm_targets [B, T]: the token to predict
        at each position (-100: none), for next-event pretraining. ends [N, 2]: (row, position) of each sample's
        last token, where the classifier reads."""
        hidden, _ = self.encode(self.embeddings(batch), seq_idx=batch.get("seq_idx"))
        lm_loss = None
        if lm_targets is not None:
            lm_loss = F.cross_entropy(
                self.next_event_logits(hidden).flatten(0, 1).float(), lm_targets.flatten(), ignore_index=-100
            )
        logits = None
        if ends is not None:
            logits = self.class_logits(hidden[ends[:, 0], ends[:, 1]])
        return EhrOutput(hidden, lm_loss, logits)

    # ----- the recurrent state: what forecasting, attributions and serving use ----------------------------------
    def encode(
        self, inputs_embeds: torch.Tensor, state: SSMState | None = None, seq_idx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, SSMState]:
        """Hidden states [B, T, D] of embedded tokens, continuing `state` (None: from the start), and the state
        after the last token."""
        return self.lm.backbone(inputs_embeds=inputs_embeds, state=state, seq_idx=seq_idx, return_state=True)

    def prefill(self, batch: dict[str, torch.Tensor], state: SSMState | None = None) -> tuple[torch.Tensor, SSMState]:
        """A history's token arrays [B, T] → hidden states [B, T, D] and the state after its last token."""
        return self.encode(self.embeddings(batch), state, batch.get("seq_idx"))

    def step(self, tokens: dict[str, torch.Tensor], state: SSMState) -> tuple[torch.Tensor, SSMState]:
        """One token per row (arrays [B]) → its hidden state [B, D] and the new state; the cost does not depend on
        how long the history is."""
        embeds = self.embeddings({name: values[:, None] for name, values in tokens.items()})[:, 0]
        return self.lm.backbone.step(None, state, inputs_embeds=embeds)

    def empty_state(self, batch_size: int) -> SSMState:
        return self.lm.empty_state(batch_size, self.lm.lm_head.weight.device)

    def next_event_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.lm_head(hidden)

    def class_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The task classifier on the hidden state at a task token ([…, D] → […])."""
        return self.classifier(hidden).squeeze(-1)

    def pretraining_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-event prediction on a packed row from `collate(…, with_lm_targets=True)`."""
        return self(batch, batch["lm_targets"]).lm_loss
