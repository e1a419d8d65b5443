"""Bidirectional LSTM baseline on the same EHR embeddings as EhrMamba (concept, age, time, type, visit order and
segment), with the same calling convention, so that the finetuning loop, checkpoints and predictions are shared.

Packed rows are split back into samples (the LSTM must not run across patients), cut to their last `context`
tokens (512 by default: a recurrent cell on a CPU is sequential in time, and 2,048 steps per sample make training
impractically slow), padded, and run with `pack_padded_sequence`; the classifier reads the forward state at the
last token and the backward state at the first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

from medstate.ehr.batching import row_ends, sample_windows
from medstate.ehr.checkpoints import CheckpointMixin
from medstate.ehr.model import EhrEmbeddings, EhrOutput, embedding_config


@dataclass
class EhrLSTMConfig:
    vocab_size: int
    d_model: int = 128
    hidden: int = 128
    n_layer: int = 1
    context: int = 512  # the LSTM reads each sample's last `context` tokens (a CPU LSTM is sequential in time)
    time_features: int = 16
    max_visit_order: int = 512
    dropout: float = 0.1


class EhrLSTM(CheckpointMixin, nn.Module):
    MODEL_TYPE = "medstate-ehr-lstm"
    CONFIG_CLASS = EhrLSTMConfig

    def __init__(self, config: EhrLSTMConfig):
        super().__init__()
        self.config = config
        self.concept = nn.Embedding(config.vocab_size, config.d_model)
        self.embeddings = EhrEmbeddings(embedding_config(config), self.concept)
        self.lstm = nn.LSTM(config.d_model, config.hidden, config.n_layer, batch_first=True, bidirectional=True)
        self.classifier = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(2 * config.hidden, 1))

    def forward(self, batch: dict[str, torch.Tensor], lm_targets=None, ends: torch.Tensor | None = None) -> EhrOutput:
        if lm_targets is not None:
            raise ValueError("the LSTM baseline is trained on the tasks only (no next-event pretraining)")
        embeds = self.embeddings(batch)  # [1, T, D] packed, or [B, T, D] one sample per row
        if ends is None:
            ends = row_ends(*embeds.shape[:2])
        windows = sample_windows(ends, embeds.shape[0], self.config.context)
        samples = [embeds[row, start:stop] for row, start, stop in windows]
        lengths = torch.tensor([len(s) for s in samples])
        padded = pad_sequence(samples, batch_first=True)
        packed = pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=False)
        _, (final, _) = self.lstm(packed)
        # final [2 * n_layer, N, H]: the last layer's forward and backward states
        features = torch.cat([final[-2], final[-1]], dim=-1)
        return EhrOutput(hidden_states=embeds, class_logits=self.classifier(features).squeeze(-1))
