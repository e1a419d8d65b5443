"""Supervised finetuning with instruction masking: the loss is on the response tokens only, examples are packed
into rows (`seq_idx` keeps them apart), and an example that does not fit a row loses the start of its prompt.

Tasks are plain data:
    pubmedqa    PubMedQA's 500-item training pool (question + context → decision + conclusion); its official test
                split is never trained on
    medquad     MedQuAD's NIH question → answer pairs (its XML folders, or the tar.gz holding them); pairs whose
                answer the authors removed (the MedlinePlus subsets) are skipped
    records     any JSON Lines / JSON / CSV / Parquet file, prompt and response written as templates over the
                record's fields, e.g. ACI-Bench: prompt "Dialogue:\\n{dialogue}\\nNote:", response " {note}"
    completion  documents (notes, abstracts): the first `prompt_fraction` of the words → the rest

A share of every task (`validation_fraction`, drawn by a hash of the example id, so it never moves) is held out for
validation; the best model on it (EMA weights when there is an EMA) is exported with its tokenizer to `model/`.
With `pubmedqa_test` set, the official test split is scored before (zero-shot) and after finetuning. Tasks listed
under `generate` are held-out generation sets (e.g. ACI-Bench's test dialogues → notes, or the second halves of
held-out notes): after finetuning each of their prompts is answered by greedy decoding and scored with ROUGE against
its response; a training example with the same prompt as one of them is removed from training, and counted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medstate.errors import MedstateError
from medstate.loading import PATH, load_settings
from medstate.ssm import load_pretrained
from medstate.ssm.lora import LoraSettings, add_lora
from medstate.text.biomed.pubmedqa import answer_of, load_pubmedqa, majority_label, prompt_of, score_pubmedqa
from medstate.text.corpora import CorpusSource, read_documents
from medstate.text.examples import Example, record_examples
from medstate.text.generate import generate_texts
from medstate.text.packing import collate, pack_documents
from medstate.text.rouge import rouge
from medstate.text.runs import export_model, language_model_loss, open_run
from medstate.text.tokenizer import TextTokenizer
from medstate.train.loop import TrainConfig, Trainer

TASK_KINDS = ("pubmedqa", "medquad", "records", "completion")


@dataclass
class SFTTask:
    name: str
    kind: str
    path: str = field(metadata=PATH)
    prompt: str = "{prompt}"  # records: templates over the record's fields
    response: str = " {response}"
    id_field: str | None = None
    text_fields: list[str] = field(default_factory=lambda: ["text"])  # completion: the document's fields
    prompt_fraction: float = 0.5
    limit: int | None = None
    pick: str = "first"  # with limit: the first examples, or `spread`: a fixed sample drawn by a hash of their ids

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise MedstateError(f"task {self.name!r}: unknown kind {self.kind!r}; choose one of {TASK_KINDS}")
        if self.pick not in ("first", "spread"):
            raise MedstateError(f"task {self.name!r}: pick must be first or spread, got {self.pick!r}")
        if not 0 < self.prompt_fraction < 1:
            raise MedstateError(f"task {self.name!r}: prompt_fraction must be between 0 and 1")


def task_examples(task: SFTTask) -> list[Example]:
    if task.kind == "pubmedqa":
        pool, _ = load_pubmedqa(task.path)  # the test split is left out here, whatever else happens
        examples = [Example(f"{task.name}:{i.id}", prompt_of(i), answer_of(i)) for i in pool]
    elif task.kind == "medquad":
        examples = [
            Example(f"{task.name}:{qid}", f"Question: {question}\nAnswer:", f" {answer}")
            for qid, question, answer in medquad_pairs(task.path)
        ]
    elif task.kind == "records":
        examples = record_examples(task.name, task.path, task.prompt, task.response, task.id_field)
    else:
        source = CorpusSource(task.name, task.path, text_fields=task.text_fields, id_field=task.id_field)
        examples = []
        for document in read_documents(source):
            words = document.text.split(" ")
            cut = max(1, int(len(words) * task.prompt_fraction))
            if cut < len(words):
                examples.append(Example(document.id, " ".join(words[:cut]), " " + " ".join(words[cut:])))
    if task.limit is None:
        return examples
    if task.pick == "spread":
        examples = sorted(examples, key=lambda e: _unit(e.id, b"pick"))
    return examples[: task.limit]


def _xml_files(path: Path) -> Iterator[tuple[str, bytes]]:
    import tarfile

    if path.is_dir():
        yield from ((str(p), p.read_bytes()) for p in sorted(path.rglob("*.xml")))
    elif path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(path) as archive:
            members = [m for m in archive.getmembers() if m.isfile() and m.name.endswith(".xml")]
            for member in sorted(members, key=lambda m: m.name):
                yield f"{path}:{member.name}", archive.extractfile(member).read()
    else:
        raise MedstateError(f"{path}: expected MedQuAD's XML folder or its .tar.gz")


def medquad_pairs(path: str | Path) -> Iterator[tuple[str, str, str]]:
    """(question id, question, answer) of every MedQuAD QAPair with an answer, whitespace collapsed."""
    import xml.etree.ElementTree as ElementTree

    files = _xml_files(Path(path))
    for where, data in files:
        try:
            root = ElementTree.fromstring(data)
        except ElementTree.ParseError as err:
            raise MedstateError(f"{where}: not valid XML ({err})") from None
        for pair in root.iter("QAPair"):
            question, answer = pair.find("Question"), pair.find("Answer")
            text = " ".join((answer.text or "").split()) if answer is not None else ""
            if question is not None and text:
                yield question.get("qid") or f"{where}#{pair.get('pid')}", " ".join((question.text or "").split()), text


def _unit(example_id: str, salt: bytes = b"") -> float:
    """A number in [0, 1) fixed by the example id (and the salt)."""
    digest = hashlib.blake2b(example_id.encode(), digest_size=8, salt=salt).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_validation(example_id: str, fraction: float) -> bool:
    return _unit(example_id) < fraction


def encode_example(example: Example, tokenizer: TextTokenizer, length: int) -> tuple[list[int], int]:
    """[eos] + prompt + response + [eos], cut to `length` (the prompt loses its start first), and where the
    response starts."""
    prompt, response = tokenizer.encode(example.prompt), [*tokenizer.encode(example.response), tokenizer.eos_id]
    response = response[: length - 2]
    prompt = prompt[max(0, len(prompt) - (length - 1 - len(response))) :]
    return [tokenizer.eos_id, *prompt, *response], 1 + len(prompt)


@dataclass
class SFTConfig:
    init: str = field(
        metadata=PATH
    )  # the model directory to finetune (as `text pretrain` writes it, with its tokenizer)
    tasks: list[SFTTask]
    tokenizer: str | None = field(default=None, metadata=PATH)  # default: the one in `init`
    seq_len: int = 1024
    batch_size: int = 8
    validation_fraction: float = 0.1
    # a PubMedQA folder: score its official test split before and after
    pubmedqa_test: str | None = field(default=None, metadata=PATH)
    generate_items: int = 0  # after SFT, generate answers for this many PubMedQA test items and score them with ROUGE
    generate: list[SFTTask] = field(default_factory=list)  # held-out generation sets (never trained on)
    # a dataset's own validation split (e.g. ACI-Bench's valid set): its loss selects the model, instead of a
    # `validation_fraction` of the tasks' examples
    validation: list[SFTTask] = field(default_factory=list)
    max_new_tokens: int = 96
    num_beams: int = 1  # generation: greedy, or beam search with this many beams
    length_penalty: float = 1.0
    eval_batch_size: int = 8
    lora: LoraSettings | None = None  # train LoRA adapters only (the base frozen); the exported model is merged
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.validation_fraction < 1:
            raise MedstateError("validation_fraction must be within [0, 1)")

    @classmethod
    def read(cls, path: str | Path, overrides: dict | None = None) -> SFTConfig:
        """A YAML file (relative paths in it are relative to its folder) with typed overrides (`load_settings`)."""
        return load_settings(cls, path, overrides, "SFT config")


@dataclass
class SFTResult:
    run_dir: Path
    model_dir: Path
    metrics: dict


def _generate_and_score(
    config: SFTConfig, model: torch.nn.Module, tokenizer: TextTokenizer, items: list[Example], path: Path
) -> dict:
    """Answers to the items' prompts (greedy or beam search), written with their references to `path`; ROUGE with
    intervals."""
    outputs = generate_texts(model, tokenizer, [e.prompt for e in items], config.max_new_tokens,
                             batch_size=config.eval_batch_size, max_prompt_tokens=config.seq_len,
                             num_beams=config.num_beams, length_penalty=config.length_penalty)  # fmt: skip
    references = [e.response for e in items]
    path.write_text(
        "".join(json.dumps({"id": e.id, "output": o, "reference": e.response}) + "\n" for e, o in zip(items, outputs))
    )
    return {k: dataclasses.asdict(v) for k, v in rouge(outputs, references).items()}


def _rows(examples: list[Example], tokenizer: TextTokenizer, length: int):
    encoded = [encode_example(e, tokenizer, length) for e in examples]
    return list(pack_documents([t for t, _ in encoded], length, tokenizer.eos_id, [s for _, s in encoded]))


def finetune(
    config: SFTConfig, run_dir: str | Path, progress: Callable[[int, int, float], None] | None = None
) -> SFTResult:
    run_dir, here = open_run(config, run_dir)
    tokenizer = TextTokenizer.load(config.tokenizer or config.init)
    model = load_pretrained(config.init, device=here.device()).train()
    if config.lora is not None:
        add_lora(model, config.lora, base=Path(config.init).resolve())
    generation_sets = {task.name: task_examples(task) for task in config.generate}
    held_prompts = {e.prompt for group in generation_sets.values() for e in group}
    examples = {task.name: task_examples(task) for task in config.tasks}
    usable = [e for group in examples.values() for e in group if e.prompt not in held_prompts]
    fraction = 0.0 if config.validation else config.validation_fraction
    train = [e for e in usable if not is_validation(e.id, fraction)]
    held = [e for task in config.validation for e in task_examples(task) if e.prompt not in held_prompts]
    held += [e for e in usable if is_validation(e.id, fraction)]
    if not train:
        raise MedstateError("SFT: no training examples (check the tasks and validation_fraction)")

    def batches(epoch: int) -> list[dict]:
        order = np.random.default_rng([config.train.seed, epoch]).permutation(len(train))
        rows = _rows([train[i] for i in order], tokenizer, config.seq_len)
        return [collate(rows[i : i + config.batch_size]) for i in range(0, len(rows), config.batch_size)]

    validation_rows = _rows(held, tokenizer, config.seq_len)

    def evaluate(scored: torch.nn.Module) -> float:
        total, tokens = 0.0, 0
        for i in range(0, len(validation_rows), config.eval_batch_size):
            loss, count = language_model_loss(scored, collate(validation_rows[i : i + config.eval_batch_size]))
            total, tokens = total + float(loss) * count, tokens + count
        return total / tokens

    pubmedqa = load_pubmedqa(config.pubmedqa_test) if config.pubmedqa_test else None
    metrics: dict = {
        "examples": {name: len(group) for name, group in examples.items()},
        "train_examples": len(train),
        "validation_examples": len(held),
        "removed_as_generation_prompts": sum(len(group) for group in examples.values()) - len(usable),
    }
    if pubmedqa is not None and here.main:
        pool, test = pubmedqa
        zero_shot = score_pubmedqa(model, tokenizer, test, majority_label(pool), config.eval_batch_size)
        metrics["pubmedqa_zero_shot"] = zero_shot.to_dict()
    trainer = Trainer(model, language_model_loss, batches, config.train, run_dir, progress,
                      evaluate if validation_rows else None)  # fmt: skip
    result = trainer.fit()
    model_dir = run_dir / "model"
    metrics.update(steps=result.steps, best_validation_loss=result.best)
    if not here.main:
        return SFTResult(run_dir, model_dir, metrics)
    export_model(trainer, tokenizer, model_dir)
    tuned = load_pretrained(model_dir, device=here.device())
    if pubmedqa is not None:
        finetuned = score_pubmedqa(tuned, tokenizer, test, majority_label(pool), config.eval_batch_size)
        metrics["pubmedqa_finetuned"] = finetuned.to_dict()
        if config.generate_items:
            items = [Example(i.id, prompt_of(i), answer_of(i)) for i in test[: config.generate_items]]
            metrics["pubmedqa_generation_rouge"] = _generate_and_score(
                config, tuned, tokenizer, items, run_dir / "generations.jsonl"
            )
    for name, items in generation_sets.items():
        metrics.setdefault("generation_rouge", {})[name] = _generate_and_score(
            config, tuned, tokenizer, items, run_dir / f"generations-{name}.jsonl"
        )
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return SFTResult(run_dir, model_dir, metrics)
