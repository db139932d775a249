# parti: make help lists the targets.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: help install test test-fast demo bench lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

install: $(VENV_STAMP)  ## create .venv and install parti (editable) with its dev extras

$(VENV_STAMP): setup.cfg pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(VENV_STAMP)

TEST_WORKERS ?= 2

test: install  ## the whole test suite (slow tests included), TEST_WORKERS=2 processes
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist load --maxschedchunk 1

test-fast: install  ## the test suite without the slow tests
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist load --maxschedchunk 1 -m "not slow"

SHAPES := data/shapes
SEED ?= 0
DEMO ?= outputs/demo

demo: install  ## shapes shards -> text tokenizer -> stage 1 -> token shards -> stage 2 -> samples + metrics (SEED=, DEMO= to vary)
	$(PY) -m parti.data.shapes_dataset --out $(SHAPES)
	$(PY) train_vqgan.py experiment=demo_vqgan trainer.seed=$(SEED) run_dir=$(DEMO)/vqgan
	$(PY) -m parti.data.tokenize --shards '$(SHAPES)/train-{00000..00007}.tar::$(SHAPES)/eval-00000.tar' \
		--tokenizer $(DEMO)/vqgan/export --out $(DEMO)/tokens
	$(PY) train_parti.py experiment=demo_parti trainer.seed=$(SEED) run_dir=$(DEMO)/parti \
		tokenizer.ckpt=$(DEMO)/vqgan/export data.token_train_shards="'$(DEMO)/tokens/train-{00000..00007}.tar'" \
		data.token_eval_shards=$(DEMO)/tokens/eval-00000.tar
	$(PY) sample.py ckpt=$(DEMO)/parti/export
	$(PY) -m parti.eval.generation ckpt=$(DEMO)/parti/export n=512 'guidance=[1,1.25,1.5]' temperature=0.6
	$(PY) -m parti.eval.report $(DEMO)/vqgan $(DEMO)/parti

bench: install  ## ours vs the public parti-pytorch, one table (bench/RESULTS.md); under 10 min on 2 CPU cores
	$(PY) -m pip install -q -e '.[bench]' torch==2.14.1 torchvision==0.29.1
	$(PY) -m parti.data.shapes_dataset --out $(SHAPES)
	$(PY) -m bench.compare --results bench/RESULTS.md

lint: install  ## ruff check
	.venv/bin/ruff check .

clean:  ## remove demo outputs (keeps .venv)
	rm -rf outputs multirun data/shapes
