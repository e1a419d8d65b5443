"""The language-model core that every text recipe stands on.

    tokenizer.py      local Hugging Face tokenizers, or a byte-level BPE trained here
    corpora.py        documents and records streamed from files (JSON Lines, JSON, CSV, Parquet, text, MEDS notes)
    contamination.py  evaluation text kept out of training corpora (n-gram guard)
    packing.py        fixed-length rows: packed (`seq_idx`) or padded, left-padded prompts
    mixing.py         a seeded, resumable stream mixed from several corpora by token share
    examples.py       prompt → response examples, records written into them through templates
    choices.py        answer choices scored by log-likelihood after a prompt
    generate.py       greedy, sampled and beam-search generation through the recurrent state
    evaluate.py       perplexity and bits per byte on held-out documents, with intervals
    rouge.py          ROUGE-1/2/L/Lsum with bootstrap intervals
    transformer.py    the same-size GPT-2-style Transformer baseline
    models.py         new / loaded language models (Mamba or the Transformer), LoRA adapters merged
    runs.py           around a recipe's trainer: the run directory, the next-token loss, the exported model

The recipes, one sub-package each, import this core (and the engine, training and evaluation packages below it),
never each other; the core imports no recipe:

    biomed/     BioMamba: continued pretraining on a mix, supervised finetuning, PubMedQA
    notes/      ClinicalMamba: longitudinal notes as documents, cohorts and coding labels, prompt classification
    summarise/  LoRA + layer pruning for summarisation: pruned checkpoints (LoRA SFT is `biomed.sft` with `lora:`)

May import: medstate.errors, medstate.loading, medstate.ssm, medstate.train, medstate.eval, medstate.data.
"""
