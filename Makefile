# Two commands for a newcomer: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mutdet-installed
CORES  ?= all

.PHONY: install demo test lint dryrun bench bench-gpu

# (Re)install whenever the pinned requirements or the package metadata change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# deepforest only ships the real aerial demo images; its own dependency set is huge.
	$(PY) -m pip install --quiet --no-deps deepforest==2.1.0
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/snakemake --cores $(CORES)
	$(VENV)/bin/snakemake --report results/report.html
	@$(PY) -m mutdet outputs --config config.yaml

# The suite, then the kernel-sensitive tests (marker `numerics`) again with other CPU kernels and one
# thread: ATen's scalar code, oneDNN and MKL limited to SSE4, so a pass that holds only for this
# machine's AVX2/AVX-512 rounding cannot hide (see tests/numerics.py).
ALT_KERNELS := ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 OMP_NUM_THREADS=1

test: $(STAMP)
	$(PY) -m pytest
	$(ALT_KERNELS) $(PY) -m pytest -q -m numerics

lint: $(STAMP)
	$(VENV)/bin/snakemake --lint

dryrun: $(STAMP)
	$(VENV)/bin/snakemake -n

# Every benchmark, each against a baseline measured in the same run (several minutes on 2 cores).
bench: $(STAMP)
	for b in tiling evaluation proposals embeddings model train pretrain overfit; do $(PY) benchmarks/$$b.py || exit 1; done

# The one GPU check (<= 8 minutes on one large GPU): CUDA/bf16 smoke tests of every GPU path, then
# throughput and peak memory; summaries in $(BENCH_GPU_OUT)/bench-gpu.{json,md}. Without a GPU it says
# what it skipped and exits 0.
BENCH_GPU_OUT ?= results/bench-gpu
bench-gpu: $(STAMP)
	$(PY) benchmarks/gpu.py --out $(BENCH_GPU_OUT)
