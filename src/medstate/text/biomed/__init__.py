"""BioMamba's recipe: continued pretraining on a weighted biomedical / general-domain mix (WSD, layer-wise LR decay,
EMA, decontamination; `pretrain`), supervised finetuning with instruction masking (`sft`), PubMedQA scored on its
official test split (`pubmedqa`), and the evaluation bundle of `medstate text eval` (`evaluate`).

May import: the text core (medstate.text.*, not its other recipes) and what the core may import.
"""
