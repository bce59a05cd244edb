# The two commands of the README: `make demo` (main job) and `make test` (tests).
# Both create or reuse .venv at the repository root. The demo installs only the training
# stack (extra `train`); the tests add the PyTorch reference stack (extra `test`). Each level
# has its own stamp, named by a checksum of pyproject.toml: `make demo` then `make test`
# upgrades the venv, `make test` then `make demo` installs nothing, an edit reinstalls.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HASH := $(shell cat pyproject.toml | cksum | cut -d' ' -f1)
TRAIN_STAMP := $(VENV)/.installed-train-$(HASH)
TEST_STAMP := $(VENV)/.installed-test-$(HASH)

.PHONY: demo demo-vl test test-fast bench clean venv

venv: $(TEST_STAMP)

$(TRAIN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[train]'
	rm -f $(VENV)/.installed-*
	touch $@

$(TEST_STAMP): $(TRAIN_STAMP)
	# torch first and pinned: an unpinned torch (pulled by peft) brings a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[train,test]'
	rm -f $(VENV)/.installed-test-*
	touch $@

# The demo starts afresh each time (a kept workdir would resume its finished runs); the
# pretrained backbone stays cached in ~/.cache/randlora_jax.
demo: $(TRAIN_STAMP)
	rm -rf runs/demo
	$(BIN)/python train.py --config=configs/demo.py --workdir=runs/demo

# The vision-language demo: a tiny CLIP pretrained once on embedded captioned shapes (cached
# in ~/.cache/randlora_jax), both towers fine-tuned by each method; zero-shot vs fine-tuned.
demo-vl: $(TRAIN_STAMP)
	rm -rf runs/demo_vl
	$(BIN)/python train.py --config=configs/clip_vl.py:demo --workdir=runs/demo_vl

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -n 2 -q

test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

bench: $(TEST_STAMP)
	$(BIN)/python bench/kernel.py
	$(BIN)/python bench/train_step.py --model vit_b16 --batch 8 --repeats 2

clean:
	rm -rf $(VENV)
