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
# Side venvs with the REAL accelerator compilers, never in the main venv (with libtpu present
# `import jax` tries a TPU first): libtpu (deviceless TPU AOT) and XLA's CUDA plugin + ptxas
# (GPU AOT from a target description). tests/test_kernel_compile.py runs them; see
# docs/kernels.md. Each has a stamp named by a checksum of its pins: an edit reinstalls.
SIDE_VENVS ?= .venvs
SIDE_COMMON := flax==0.12.8 optax==0.2.8 ml_collections==1.1.0
# `train.py --compile_for` (randlora_jax/aot.py, tests/test_aot.py) imports the trainer's task
# modules, hence the training stack's data and checkpoint packages (versions of the main venv).
SIDE_COMMON += orbax-checkpoint==0.12.8 tensorflow-datasets==4.9.10 array_record==0.8.6 \
	grain==0.2.18 pillow==13.0.0 safetensors==0.8.0 tqdm==4.70.1
TPU_PINS := jax[tpu]==0.10.2 $(SIDE_COMMON)
GPU_PINS := jax==0.10.2 jaxlib==0.10.2 jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2 \
	nvidia-cuda-nvcc-cu12==12.9.86 $(SIDE_COMMON)
TPU_STAMP := $(SIDE_VENVS)/tpu/.installed-$(shell echo '$(TPU_PINS)' | cksum | cut -d' ' -f1)
GPU_STAMP := $(SIDE_VENVS)/gpu/.installed-$(shell echo '$(GPU_PINS)' | cksum | cut -d' ' -f1)
export RANDLORA_SIDE_VENVS := $(abspath $(SIDE_VENVS))

.PHONY: demo demo-vl demo-llm test test-fast test-clients bench clean venv side-venvs

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

side-venvs: $(TPU_STAMP) $(GPU_STAMP)

$(TPU_STAMP):
	test -x $(SIDE_VENVS)/tpu/bin/python || $(PY) -m venv $(SIDE_VENVS)/tpu
	$(SIDE_VENVS)/tpu/bin/python -m pip install -q $(TPU_PINS:jax[tpu]%='jax[tpu]%')
	rm -f $(SIDE_VENVS)/tpu/.installed-*
	touch $@

$(GPU_STAMP):
	test -x $(SIDE_VENVS)/gpu/bin/python || $(PY) -m venv $(SIDE_VENVS)/gpu
	$(SIDE_VENVS)/gpu/bin/python -m pip install -q $(GPU_PINS)
	rm -f $(SIDE_VENVS)/gpu/.installed-*
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

# The LLM demo: a tiny decoder pretrained once on an embedded corpus (cached), fine-tuned by
# each method on a generated commonsense-style set, scored by the paper's protocol.
demo-llm: $(TRAIN_STAMP)
	rm -rf runs/llm_demo
	$(BIN)/python train.py --config=configs/commonsense.py:demo --workdir=runs/llm_demo

test: $(TEST_STAMP) $(TPU_STAMP) $(GPU_STAMP)
	$(BIN)/python -m pytest -n 2 -q

# Third-party clients that cannot share the main venv (transformers 4 Flax models, Tunix's
# PeftTrainer and RL trainers): each in its own venv under .venvs/, never collected by
# `make test`. The Tunix RL tests run on 4 virtual CPU devices (actor and rollout meshes).
test-clients:
	test -x .venvs/tunix/bin/python || ($(PY) -m venv .venvs/tunix && .venvs/tunix/bin/pip install -q jax==0.10.2 jaxlib==0.10.2 flax==0.12.8 google-tunix==0.1.7 pytest && .venvs/tunix/bin/pip install -q -e . --no-deps)
	test -x .venvs/tf4/bin/python || ($(PY) -m venv .venvs/tf4 && .venvs/tf4/bin/pip install -q jax==0.10.2 jaxlib==0.10.2 flax==0.12.8 optax==0.2.8 transformers==4.57.6 qwix==0.1.8 ml_collections chex orbax-checkpoint opt_einsum pytest && .venvs/tf4/bin/pip install -q -e . --no-deps)
	XLA_FLAGS=--xla_force_host_platform_device_count=4 .venvs/tunix/bin/python -m pytest tests_clients/test_tunix.py tests_clients/test_tunix_rl.py -q
	.venvs/tf4/bin/python -m pytest tests_clients/test_transformers4.py -q

test-fast: $(TEST_STAMP) $(TPU_STAMP) $(GPU_STAMP)
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

bench: $(TEST_STAMP)
	$(BIN)/python bench/kernel.py
	$(BIN)/python bench/train_step.py --model vit_b16 --batch 8 --repeats 2

# Compile a run's training step for a TPU slice or GPU this host lacks (docs/compile_for.md):
#   make compile-for CONFIG=configs/commonsense.py:llama3_8b TARGET=v5p-8
# train.py re-executes itself under .venvs/tpu or .venvs/gpu (the target's compiler).
.PHONY: compile-for
compile-for: $(TRAIN_STAMP)
	$(BIN)/python train.py --config=$(CONFIG) --compile_for=$(TARGET) $(ARGS)

clean:
	rm -rf $(VENV)
