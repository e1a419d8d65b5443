"""Transformer baselines on the same EHR embeddings as EhrMamba: a BERT-style encoder at 512 tokens with masked
language model (MLM) pretraining (CEHR-BERT-like), and Hugging Face BigBird (block-sparse attention) at the
EhrMamba context. MultiBird is BigBird finetuned with the same prompted multitask recipe as EhrMamba.

- The encoder is Hugging Face `BertModel` or `BigBirdModel` fed `inputs_embeds` from our `EhrEmbeddings` (concept,
  age, time, token type, visit order and segment); the encoder adds its absolute position embeddings.
- Packed rows are split back into samples (attention must not cross patients), cut to their last `context` tokens
  and padded, with an attention mask.
- The classifier reads the final token (in prompted finetuning, the task token; attention is bidirectional, so it
  sees the whole window).
- MLM pretraining: a random `context`-token window of each history; 15% of its event tokens are picked, of which
  80% become [MASK], 10% a random code and 10% stay; the loss is cross-entropy at the picked positions, through a
  head tied to the concept embedding. The masks come from torch's global generator, which the trainer checkpoints,
  so a resumed run draws the same masks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from medstate.ehr.batching import row_ends, sample_windows
from medstate.ehr.checkpoints import CheckpointMixin
from medstate.ehr.model import EhrEmbeddings, EhrOutput, embedding_config
from medstate.ehr.sequences import SPECIAL_TOKENS, TYPE_EVENT
from medstate.errors import MedstateError

ARCHITECTURES = ("bert", "bigbird")
MASK_ID = SPECIAL_TOKENS.index("[MASK]")


@dataclass
class EhrTransformerConfig:
    vocab_size: int
    architecture: str = "bert"  # "bert" (full attention) or "bigbird" (block-sparse)
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    context: int = 512
    block_size: int = 64  # BigBird only
    num_random_blocks: int = 3  # BigBird only
    mlm_probability: float = 0.15
    time_features: int = 16
    max_visit_order: int = 512
    dropout: float = 0.1


def _hf_encoder(config: EhrTransformerConfig) -> nn.Module:
    if config.architecture not in ARCHITECTURES:
        raise MedstateError(f"unknown architecture {config.architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    try:
        import transformers
    except ImportError:
        raise MedstateError(
            "the Transformer baselines need Hugging Face transformers: pip install 'medstate[baselines]'"
        ) from None
    common = dict(
        vocab_size=1,  # tokens arrive as inputs_embeds; the encoder's own word table stays unused
        hidden_size=config.d_model,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        intermediate_size=4 * config.d_model,
        hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.dropout,
        max_position_embeddings=config.context,
        type_vocab_size=1,
        pad_token_id=0,
    )
    if config.architecture == "bert":
        return transformers.BertModel(transformers.BertConfig(**common), add_pooling_layer=False)
    hf_config = transformers.BigBirdConfig(
        **common,
        attention_type="block_sparse",
        block_size=config.block_size,
        num_random_blocks=config.num_random_blocks,
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
    )
    # BigBird logs a warning on every batch whose length is not a multiple of the block size (it pads them)
    logging.getLogger("transformers.models.big_bird.modeling_big_bird").setLevel(logging.ERROR)
    return transformers.BigBirdModel(hf_config, add_pooling_layer=False)


def mlm_corrupt(
    ids: torch.Tensor, token_types: torch.Tensor, probability: float, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking, on event tokens only: each is picked with `probability`; a picked token becomes [MASK] (80%),
    a random code (10%) or stays (10%). Returns the corrupted ids and the targets (-100 where not picked)."""
    picked = (token_types == TYPE_EVENT) & (torch.rand(ids.shape) < probability)
    draw = torch.rand(ids.shape)
    corrupted = torch.where(picked & (draw < 0.8), MASK_ID, ids)
    random_codes = torch.randint(len(SPECIAL_TOKENS), vocab_size, ids.shape)
    corrupted = torch.where(picked & (draw >= 0.8) & (draw < 0.9), random_codes, corrupted)
    return corrupted, torch.where(picked, ids, -100)


def _length_groups(lengths: list[int], slack: float = 1.25) -> list[list[int]]:
    """Indices grouped by length (ascending) so that a group's longest member is at most `slack` times (or 64
    tokens more than) its shortest."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if groups and lengths[i] <= max(slack * lengths[groups[-1][0]], lengths[groups[-1][0]] + 64):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class EhrTransformer(CheckpointMixin, nn.Module):
    MODEL_TYPE = "medstate-ehr-transformer"
    CONFIG_CLASS = EhrTransformerConfig

    def __init__(self, config: EhrTransformerConfig):
        super().__init__()
        self.config = config
        self.concept = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.concept.weight, std=0.02)  # BERT's initialisation; the MLM head is tied to it
        self.embeddings = EhrEmbeddings(embedding_config(config), self.concept)
        self.encoder = _hf_encoder(config)
        self.mlm_transform = nn.Sequential(
            nn.Linear(config.d_model, config.d_model), nn.GELU(), nn.LayerNorm(config.d_model)
        )
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.classifier = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.d_model, 1))

    def _encode(self, embeds: torch.Tensor, windows: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [N, L, D] of each window (padded) and the windows' lengths [N]. Windows of similar length
        go through the encoder together, so a batch of short samples is not padded to its longest one."""
        samples = [embeds[row, start:stop] for row, start, stop in windows]
        lengths = torch.tensor([len(s) for s in samples])
        hidden = embeds.new_zeros(len(samples), int(lengths.max()), embeds.shape[-1])
        for group in _length_groups(lengths.tolist()):
            padded = pad_sequence([samples[i] for i in group], batch_first=True)
            mask = (torch.arange(padded.shape[1])[None] < lengths[group, None]).long()
            self._choose_attention(padded.shape[1])
            out = self.encoder(inputs_embeds=padded, attention_mask=mask).last_hidden_state
            hidden = hidden.index_put((torch.tensor(group),), F.pad(out, (0, 0, 0, hidden.shape[1] - out.shape[1])))
        return hidden, lengths

    def _choose_attention(self, length: int) -> None:
        """BigBird: block-sparse attention where the length allows it, full attention below. (Hugging Face BigBird
        switches itself to full attention for good the first time it meets a short input; choosing per call keeps
        long inputs block-sparse.)"""
        if self.config.architecture == "bigbird":
            shortest_sparse = (5 + 2 * self.config.num_random_blocks) * self.config.block_size
            self.encoder.set_attention_type("block_sparse" if length > shortest_sparse else "original_full")

    def forward(self, batch: dict[str, torch.Tensor], lm_targets=None, ends: torch.Tensor | None = None) -> EhrOutput:
        if lm_targets is not None:
            raise ValueError("the Transformer baselines pretrain by masked language modelling: use pretraining_loss")
        embeds = self.embeddings(batch)
        if ends is None:
            ends = row_ends(*embeds.shape[:2])
        hidden, lengths = self._encode(embeds, sample_windows(ends, embeds.shape[0], self.config.context))
        last = hidden[torch.arange(len(lengths)), lengths - 1]
        return EhrOutput(hidden_states=hidden, class_logits=self.classifier(last).squeeze(-1))

    def pretraining_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """MLM on a random window of each sample in a packed row (from `collate`)."""
        ids = batch["input_ids"]
        windows = []
        for row, start, stop in sample_windows(batch["ends"], ids.shape[0], ids.shape[1]):  # whole samples
            offset = int(torch.randint(0, max(1, stop - start - self.config.context + 1), ()))
            windows.append((row, start + offset, min(stop, start + offset + self.config.context)))
        corrupted, targets = mlm_corrupt(ids, batch["token_types"], self.config.mlm_probability, self.config.vocab_size)
        hidden, _ = self._encode(self.embeddings({**batch, "input_ids": corrupted}), windows)
        target_windows = pad_sequence([targets[row, start:stop] for row, start, stop in windows], True, -100)
        if not (target_windows != -100).any():
            return hidden.sum() * 0.0  # nothing picked in this batch: a zero loss that keeps the graph
        logits = F.linear(self.mlm_transform(hidden), self.concept.weight, self.mlm_bias)
        return F.cross_entropy(logits.flatten(0, 1).float(), target_windows.flatten(), ignore_index=-100)
