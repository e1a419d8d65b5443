"""retained_memory: inside it, large tensors allocated and freed step after step stop costing page faults (the
memory stays in the process); with glibc's defaults each one is unmapped when freed and faulted in again. Measured
with the minor page-fault count of a fresh process (glibc's state depends on what a process did before)."""

import json
import platform
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc settings only"
)
PAGES = 64 * 2**20 // 4096  # a 64 MB tensor: above glibc's largest mmap threshold (32 MB)
ROUNDS = f"""
import json, resource, sys, torch
from medstate.train.memory import retained_memory

counts = []
with retained_memory(sys.argv[1] == "kept") as active:
    for _ in range(4):  # rounds of 5 allocations (touched, then freed) of a 64 MB tensor
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            torch.ones({PAGES} * 1024)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({{"active": active, "faults": counts}}))
"""


def rounds(mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_freed_memory_is_reused_inside_and_unmapped_by_default():
    kept, default = rounds("kept"), rounds("default")
    assert kept["active"] and not default["active"]
    assert kept["faults"][-1] < PAGES // 10  # steady state: no page is faulted in again
    assert min(default["faults"]) > 4 * PAGES  # each of the 5 allocations faults its pages in


class TwoHeads(torch.nn.Module):
    """A model with a parameter the loss never uses (as EhrMamba's classifier in pretraining)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.used, self.unused = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def save_pretrained(self, directory):
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, directory / "model.safetensors")


def _train(tmp_path, retain: bool, accumulation: int):
    from medstate.train.loop import TrainConfig, Trainer

    model = TwoHeads()
    generator = torch.Generator().manual_seed(1)
    data = [torch.randn(4, 8, generator=generator) for _ in range(12)]

    def loss_fn(m, x):
        return (m.used(x) - x.flip(1)).pow(2).mean(), len(x)

    config = TrainConfig(max_steps=5, lr=0.05, weight_decay=0.1, warmup_steps=0, grad_accumulation=accumulation,
                         save_every=100, retain_memory=retain)  # fmt: skip
    trainer = Trainer(model, loss_fn, lambda epoch: data, config, tmp_path / f"run-{retain}-{accumulation}")
    pointers = []
    trainer.optimizer.register_step_pre_hook(lambda *_: pointers.append(model.used.weight.grad.data_ptr()))
    trainer.fit()
    return model, pointers


@pytest.mark.parametrize("accumulation", [1, 2])
def test_kept_gradients_train_exactly_as_freed_ones(tmp_path, accumulation):
    kept, pointers = _train(tmp_path, True, accumulation)
    freed, _ = _train(tmp_path, False, accumulation)
    for name, parameter in kept.named_parameters():
        assert torch.equal(parameter, dict(freed.named_parameters())[name]), name
    assert len(set(pointers)) == 1  # one buffer, accumulated into in place, step after step
    untouched = TwoHeads()
    # no gradient, so AdamW skipped it: no weight decay, no moment update
    assert torch.equal(kept.unused.weight, untouched.unused.weight) and kept.unused.weight.grad is None
    assert not torch.equal(kept.used.weight, untouched.used.weight)
