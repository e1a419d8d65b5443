"""Run by tests/text/test_distributed.py, under torchrun or alone: the text pretraining recipe on a config given as a
YAML file (the test writes it). Not a test module itself."""

import sys

import torch

from medstate.text.biomed.pretrain import PretrainConfig, pretrain

if __name__ == "__main__":
    torch.set_num_threads(1)  # two processes on two cores
    pretrain(PretrainConfig.read(sys.argv[1]), sys.argv[2])
