"""Epoch batches shared out among processes: together the processes take what one process takes, in groups of
`world`, an epoch's incomplete last group left out, and the saved position means the same on any number."""

import pytest

from medstate import MedstateError
from medstate.train.batches import EpochBatches


def listing(epoch):
    return [f"e{epoch}b{i}" for i in range(5)]


def take(stream, n):
    return [next(stream) for _ in range(n)]


def test_two_processes_share_one_process_batches():
    one = EpochBatches(listing)
    ranks = [EpochBatches(listing) for _ in range(2)]
    for rank, stream in enumerate(ranks):
        stream.shard(rank, 2)
    single = take(one, 10)
    pairs = list(zip(take(ranks[0], 4), take(ranks[1], 4)))
    # epoch 0: (b0, b1), (b2, b3), b4 left out; epoch 1: (b0, b1), (b2, b3)
    assert pairs == [("e0b0", "e0b1"), ("e0b2", "e0b3"), ("e1b0", "e1b1"), ("e1b2", "e1b3")]
    assert single[:4] == ["e0b0", "e0b1", "e0b2", "e0b3"] and single[5] == "e1b0"
    assert ranks[0].state_dict() == ranks[1].state_dict() == {"epoch": 1, "index": 4}


def test_position_resumes_on_one_process():
    rank0 = EpochBatches(listing)
    rank0.shard(0, 2)
    take(rank0, 1)
    resumed = EpochBatches(listing)
    resumed.load_state_dict(rank0.state_dict())
    assert take(resumed, 3) == ["e0b2", "e0b3", "e0b4"]


def test_too_few_batches_for_the_processes():
    stream = EpochBatches(lambda epoch: ["only"])
    stream.shard(0, 2)
    with pytest.raises(MedstateError, match="cannot feed 2 processes"):
        next(stream)
