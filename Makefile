# Quickstart targets. Each installs what it needs into .venv on a fresh machine (torch pinned to 2.13.0).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: install demo serve-demo demo-engine text-demo test lint bench bench-ehr meds-tools clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# the CPU build of torch first: an unpinned resolver would pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/medstate ehr demo --data-dir data/demo --out runs/demo

DEMO_MODEL := runs/demo/finetune/ehrmamba/seed0/checkpoints/last

serve-demo: $(STAMP)
	test -f $(DEMO_MODEL)/vocab.json || $(MAKE) demo
	$(BIN)/medstate serve $(DEMO_MODEL) --db runs/serve/demo.db

demo-engine: $(STAMP)
	$(BIN)/medstate ssm demo --out runs/engine-demo

# the MEDS ecosystem's tools in their own environment (they pin an older polars): ACES (`aces-cli`, task labels in),
# meds-evaluation (predictions out) and meds-torch-data (the tensorization benchmarks/ehr_scale.py compares with)
MEDS_TOOLS := .venv-meds
meds-tools: $(MEDS_TOOLS)/.installed
$(MEDS_TOOLS)/.installed:
	$(PYTHON) -m venv $(MEDS_TOOLS)
	$(MEDS_TOOLS)/bin/python -m pip install --quiet torch==2.13.0
	$(MEDS_TOOLS)/bin/python -m pip install --quiet "es-aces==0.7.3" "meds-evaluation==0.0.6" "meds-torch-data==0.9.0"
	touch $@

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/backbone.py
	$(BIN)/python benchmarks/data.py

# the EHR benchmark of docs/results/ehr-benchmark.md: 615 Synthea + 100 MIMIC-IV demo patients from ../shared,
# 7 models x 6 tasks x 3 seeds (hours on 2 cores; re-running resumes where it stopped)
BENCH_EHR := runs/ehr-benchmark
bench-ehr: $(STAMP)
	$(BIN)/medstate data convert -f fhir ../shared/data/synthea-fhir-r4-smart $(BENCH_EHR)/meds/synthea --split 0.6,0.2,0.2 --overwrite
	$(BIN)/medstate data convert -f mimic-iv ../shared/data/mimic-iv-demo-2.2 $(BENCH_EHR)/meds/mimic --split 0.6,0.2,0.2 --overwrite
	test -f $(BENCH_EHR)/prepared/samples.parquet || $(BIN)/medstate ehr prepare $(BENCH_EHR)/meds/synthea $(BENCH_EHR)/meds/mimic --out $(BENCH_EHR)/prepared
	$(BIN)/medstate ehr benchmark $(BENCH_EHR)/prepared $(BENCH_EHR)/run
	$(BIN)/python benchmarks/ehr_long.py

# BioMamba's recipe in small, on the shipped text (data/demo/text): pretrain a small Mamba-2 on an 80/10/10
# biomedical/C4/Wikipedia mix (WSD, layer-wise LR decay, EMA), perplexity on held-out abstracts and WikiText-2, SFT on
# PubMedQA's training pool, the official test split scored zero-shot and after, generated answers scored by ROUGE
TEXT_DEMO := runs/text-demo
text-demo: $(STAMP)
	rm -rf $(TEXT_DEMO)
	$(BIN)/medstate text pretrain data/demo/text/pretrain.yaml $(TEXT_DEMO)/pretrain
	$(BIN)/medstate text eval $(TEXT_DEMO)/pretrain/model --corpora data/demo/text/heldout.yaml --length 1024 --out $(TEXT_DEMO)/eval.json
	$(BIN)/medstate text sft data/demo/text/sft.yaml $(TEXT_DEMO)/sft --init $(TEXT_DEMO)/pretrain/model
	$(BIN)/medstate text generate $(TEXT_DEMO)/sft/model --prompt "Context: Aspirin lowered the rate of stroke in the trial.\nQuestion: Does aspirin prevent stroke?\nAnswer:" --max-new-tokens 32

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
