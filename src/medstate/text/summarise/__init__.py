"""The summarisation recipe's compression step: whole blocks pruned from a language model, by a list or by their
measured influence on calibration text (`pruning`). LoRA itself is a model component (`medstate.ssm.lora`), trained
by `medstate.text.biomed.sft` with `lora:`; generation and ROUGE are in the core.

May import: the text core (medstate.text.*, not its other recipes) and what the core may import.
"""
