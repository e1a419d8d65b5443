"""Recurrent behaviour of the language model: stepping, state I/O, packing, generation."""

import pytest
import torch

from medstate import MedstateError
from medstate.ssm import MambaLM, SSMConfig, SSMState, load_pretrained


def tiny(version: int, **overrides) -> MambaLM:
    config = SSMConfig(
        version=version,
        vocab_size=61,
        d_model=32,
        n_layer=2,
        d_state=8,
        head_dim=8,
        n_groups=2,
        chunk_size=16,
        **overrides,
    )
    return MambaLM(config).eval()


@pytest.fixture(params=[1, 2], ids=["mamba1", "mamba2"])
def model(request):
    return tiny(request.param)


def test_prefill_then_step_equals_forward_at_every_position(model):
    ids = torch.randint(0, 61, (2, 40))
    with torch.no_grad():
        full = model(ids).logits
        for split in (1, 7, 23):  # prefill `split` tokens, then teacher-force the rest one step at a time
            out = model(ids[:, :split], return_state=True)
            assert torch.allclose(out.logits, full[:, :split], atol=1e-5)
            state = out.state
            for t in range(split, 40):
                step = model.step(ids[:, t], state)
                assert torch.allclose(step.logits, full[:, t], atol=1e-4), t
                state = step.state


def test_step_from_empty_state_equals_forward(model):
    ids = torch.randint(0, 61, (3, 12))
    with torch.no_grad():
        full = model(ids).logits
        state = None
        for t in range(12):
            out = model.step(ids[:, t], state)
            state = out.state
            assert torch.allclose(out.logits, full[:, t], atol=1e-4)


def test_forward_continues_from_state(model):
    ids = torch.randint(0, 61, (2, 50))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :19], return_state=True)
        second = model(ids[:, 19:], state=first.state)
    assert torch.allclose(second.logits, full[:, 19:], atol=1e-4)


def test_state_save_load_continue(model, tmp_path):
    ids = torch.randint(0, 61, (2, 30))
    with torch.no_grad():
        state = model(ids[:, :20], return_state=True).state
        state.save(tmp_path / "state.safetensors")
        loaded = SSMState.load(tmp_path / "state.safetensors")
        a = model(ids[:, 20:], state=state).logits
        b = model(ids[:, 20:], state=loaded).logits
    assert torch.equal(a, b)
    assert [s.shape for s in loaded.ssm] == [s.shape for s in state.ssm]


def test_state_batch_operations(model):
    ids = torch.randint(0, 61, (3, 15))
    with torch.no_grad():
        state = model(ids, return_state=True).state
        parts = state.split(1)
        assert len(parts) == 3 and parts[1].batch_size == 1
        rejoined = SSMState.cat([parts[2], parts[0]])
        picked = state.select([2, 0])
        for a, b in zip(rejoined.ssm + rejoined.conv, picked.ssm + picked.conv):
            assert torch.equal(a, b)
        # stepping the stacked states equals stepping each patient alone
        token = torch.tensor([5, 9])
        together = model.step(token, rejoined).logits
        alone = torch.cat([model.step(token[i : i + 1], p).logits for i, p in enumerate([parts[2], parts[0]])])
    assert torch.allclose(together, alone, atol=1e-5)


def test_state_size_is_independent_of_history(model):
    with torch.no_grad():
        short = model(torch.randint(0, 61, (1, 5)), return_state=True).state
        long = model(torch.randint(0, 61, (1, 300)), return_state=True).state
    assert [t.shape for t in short.ssm + short.conv] == [t.shape for t in long.ssm + long.conv]


def test_packed_batch_equals_each_sequence_alone(model):
    lengths = [13, 1, 22, 9]  # includes a 1-token sequence and boundaries inside and across chunks
    seqs = [torch.randint(0, 61, (n,)) for n in lengths]
    packed = torch.cat(seqs)[None]
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    out = model(packed, seq_idx=seq_idx, return_state=True)
    offsets = [0, 13, 14, 36, 45]
    for i, seq in enumerate(seqs):
        alone = model(seq[None], return_state=True)
        piece = out.logits[:, offsets[i] : offsets[i + 1]]
        assert torch.allclose(piece, alone.logits, atol=1e-5), i
    # the packed row's final state is the last sequence's state alone
    for a, b in zip(out.state.ssm, alone.state.ssm):
        assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip(out.state.conv, alone.state.conv):
        assert torch.allclose(a, b, atol=1e-6)
    # and no gradient flows between packed sequences
    embeds = model.backbone.embeddings(packed).detach().requires_grad_()
    logits = model(inputs_embeds=embeds, seq_idx=seq_idx).logits
    logits[0, offsets[2] : offsets[3]].sum().backward()
    grad_norm = embeds.grad[0].norm(dim=-1)
    inside = grad_norm[offsets[2] : offsets[3]]
    assert inside.min() > 0
    # Mamba-2 reads decays as differences of cumulative sums, so the gradient reaching an earlier
    # sequence is +g - g: zero in exact arithmetic, float32 round-off here
    assert grad_norm[: offsets[2]].max() <= 1e-6 * inside.max()
    assert grad_norm[offsets[3] :].max() == 0


def test_inputs_embeds_equals_input_ids(model):
    ids = torch.randint(0, 61, (2, 17))
    with torch.no_grad():
        a = model(ids).logits
        b = model(inputs_embeds=model.backbone.embeddings(ids)).logits
        state = model(ids[:, :16], return_state=True).state
        c = model.step(inputs_embeds=model.backbone.embeddings(ids[:, 16]), state=state).logits
    assert torch.equal(a, b)
    assert torch.allclose(c, a[:, 16], atol=1e-5)


def test_greedy_generate_equals_argmax_of_full_forward(model):
    prompt = torch.randint(0, 61, (2, 9))
    generated = model.generate(prompt, max_new_tokens=15, temperature=0.0)
    assert generated.shape == (2, 24)
    assert torch.equal(generated[:, :9], prompt)
    with torch.no_grad():
        logits = model(generated).logits
    # every generated token is the argmax of the full forward over everything before it
    assert torch.equal(generated[:, 9:], logits[:, 8:-1].argmax(-1))


def test_generate_stops_at_eos_and_samples_reproducibly(model):
    prompt = torch.randint(0, 61, (2, 5))
    with torch.no_grad():
        first = model(prompt).logits[:, -1].argmax(-1)
    eos = int(first[0])
    out = model.generate(prompt, max_new_tokens=10, eos_token_id=eos)
    assert out[0, 5] == eos and (out[0, 5:] == eos).all()
    a = model.generate(prompt, 8, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 8, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_prefill_in_segments_equals_forward(model):
    ids = torch.randint(0, 61, (1, 100))
    with torch.no_grad():
        full = model(ids, return_state=True)
        seg = model.prefill(ids, segment_length=32)
    assert torch.allclose(seg.hidden_states, full.hidden_states, atol=1e-5)
    assert torch.allclose(seg.logits, full.logits[:, -1], atol=1e-4)
    for a, b in zip(seg.state.ssm, full.state.ssm):
        assert torch.allclose(a, b, atol=1e-5)


def test_loss_and_training_step_reduce_loss(model):
    model.train()
    ids = torch.randint(0, 61, (4, 24))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_gradient_checkpointing_gives_same_gradients(model):
    ids = torch.randint(0, 61, (2, 20))
    model(ids, labels=ids).loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.backbone.gradient_checkpointing = True
    model(ids, labels=ids).loss.backward()
    for a, p in zip(plain, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_bf16_autocast_runs_and_stays_close(model):
    ids = torch.randint(0, 61, (2, 40))
    with torch.no_grad():
        ref = model(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids).logits.float()
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()


def test_save_and_load_roundtrip(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    again = load_pretrained(tmp_path / "ckpt")
    ids = torch.randint(0, 61, (1, 10))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    assert again.config.to_hf_dict() == model.config.to_hf_dict()


def test_load_errors_are_user_errors(tmp_path):
    with pytest.raises(MedstateError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedstateError, match=r"no config\.json"):
        load_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "mamba2", "vocab_size": 10,')
    with pytest.raises(MedstateError, match="not valid JSON"):
        load_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(MedstateError, match="model_type"):
        load_pretrained(tmp_path / "empty")
    tiny(2).save_pretrained(tmp_path / "ok")
    (tmp_path / "ok" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(MedstateError, match="cannot read weights"):
        load_pretrained(tmp_path / "ok")


def test_sharded_safetensors_checkpoint(model, tmp_path):
    """model.safetensors.index.json + shards, as transformers writes large checkpoints."""
    import json

    from safetensors.torch import save_file

    model.save_pretrained(tmp_path / "single")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(out / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, shard))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ids = torch.randint(0, 61, (1, 12))
    with torch.no_grad():
        assert torch.equal(load_pretrained(out)(ids).logits, model(ids).logits)
    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MedstateError, match="missing shard"):
        load_pretrained(out)


def test_fused_loss_equals_full_logits_loss(model):
    ids = torch.randint(0, 61, (3, 37))
    labels = ids.clone()
    labels[0, :5] = -100
    full = model(ids, labels=labels)
    full.loss.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    fused = model(ids, labels=labels, return_logits=False)
    assert fused.logits is None
    assert torch.allclose(fused.loss, full.loss, atol=1e-6)
    fused.loss.backward()
    for w, p in zip(want, model.parameters()):
        assert torch.allclose(p.grad, w, atol=1e-6, rtol=1e-4)


def test_mixer_recomputation_gives_same_gradients(model):
    ids = torch.randint(0, 61, (2, 33))
    grads = []
    for recompute in (False, True):
        for layer in model.backbone.layers:
            layer.mixer.recompute = recompute
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_load_in_bfloat16_keeps_state_recurrence_in_float32(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    low = load_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert low.backbone.embeddings.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 61, (2, 20))
    with torch.no_grad():
        out = low(ids, return_state=True)
        ref = model(ids).logits
    assert all(s.dtype == torch.float32 for s in out.state.ssm)
    assert (out.logits.float() - ref).abs().max() < 0.1 * ref.abs().max()
    step = low.step(ids[:, -1], out.state)
    assert step.logits.dtype == torch.bfloat16 and all(s.dtype == torch.float32 for s in step.state.ssm)
