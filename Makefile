# The two commands a new user runs (see README):  make demo   and   make test
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test system-deps deepspeed-ops bench gpu-check

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[all]"
	touch $@

install: $(VENV)/.installed

# A real 2-process DDP run of the tutorial CNN on the embedded real digits, streamed from webdataset shards; prints test accuracy.
# train.resume=auto: a second `make demo` continues runs/cnn_digits (done at once) instead of being refused.
demo: install
	$(PY) -m dist_train data prepare --source digits --out data/digits
	$(VENV)/bin/torchrun --nproc_per_node 2 -m dist_train train configs/cnn_digits.yaml train.progress_bar=false train.resume=auto

# System packages some tests need (Slurm and munge for the real-cluster tests); a no-op when present.
system-deps:
	bash tests/install_system_deps.sh

# DeepSpeed's CPU Adam (what a JSON's optimizer runs under ZeRO offload_optimizer, as Hugging Face's published
# JSONs have it) is JIT-compiled on first use: ~3 min on 2 loaded cores. Built once into torch's extension cache
# (~/.cache/torch_extensions) here, so no test pays it; a no-op when it is there.
deepspeed-ops: install
	$(PY) -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()"

test: install system-deps deepspeed-ops
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/run_all.py

# The CUDA path proven on one GPU in one go (< 8 min): gpu-marked tests + throughput/MFU/checkpoint/data-wait table.
gpu-check: install
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)
