# llmops: every target installs what it needs into .venv first (pinned; CPU torch on CPU machines).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONFIG ?= configs/quickstart.yaml
LLM_CONFIG ?= configs/llm-quickstart.yaml
# pytest-xdist workers for `make test` (a test file stays on one worker): two take a tenth to a quarter off one's time
# on two cores (docs/testing.md); 0 runs the suite in pytest's own process
TEST_WORKERS ?= 2
STAMP := $(VENV)/.installed
# llama-cpp-python's source distribution: the llama.cpp it vendors is built once per pin (scripts/build-llama-cpp.sh)
LLAMA_CPP_PIN := 0.3.36

# Offline by default: the packaged corpus and model need no hub. Set HF_HUB_OFFLINE=0 to use hub ids.
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect
export TOKENIZERS_PARALLELISM := false
export PYTHONWARNINGS := ignore::DeprecationWarning,ignore::FutureWarning

.PHONY: install run run-llm test lint bench-compression bench-generation bench-training-padding bench-generation-serving bench-llm-runtimes bench-llm-lifecycle bench-serving bench-monitoring bench-scale serve monitor drift-demo evidently-ui up down rollback mlflow-ui lock clean

install: $(STAMP)
	@bash scripts/build-llama-cpp.sh $(LLAMA_CPP_PIN) $(VENV)/llama.cpp $(PY)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, exactly: a range that admits a newer torch pulls gigabytes of CUDA wheels.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r requirements.lock
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $@

run: install  ## the quickstart lifecycle: ends with a gated champion in ./mlflow.db
	$(VENV)/bin/llmops run --config $(CONFIG)

run-llm: install  ## the generative quickstart: ends with a gated `tweet-generator` champion in ./mlflow.db
	$(VENV)/bin/llmops run --config $(LLM_CONFIG)

test: install  ## lint, types, and the whole suite except GPU tests
	$(VENV)/bin/ruff check llmops flows serving monitoring cli tests bench
	$(VENV)/bin/ruff format --check llmops flows serving monitoring cli tests bench
	$(VENV)/bin/mypy llmops flows serving monitoring cli
	$(VENV)/bin/lint-imports  # the layers of docs/architecture.md: no circles, no upward imports
	$(PY) -m pytest -m "not gpu" -n $(TEST_WORKERS) --dist loadfile tests  # a test file stays on one worker

lint: install
	$(VENV)/bin/ruff check --fix llmops flows serving monitoring cli tests bench
	$(VENV)/bin/ruff format llmops flows serving monitoring cli tests bench

bench-compression: install  ## teacher vs student vs int8 vs bnb-int8 vs NF4 -> bench/results/compression.{md,json}
	$(PY) bench/compression.py --config $(CONFIG)

bench-generation: install  ## generative teacher vs student vs int8 vs bnb-int8 vs NF4 -> bench/results/generation.{md,json}
	$(PY) bench/generation.py --config $(LLM_CONFIG)

bench-training-padding: install  ## the teacher's training step: rows in length parts vs one padded pass -> bench/results/training_padding.{md,json}
	$(PY) bench/training_padding.py

bench-generation-serving: install  ## ours (continuous batching on/off) vs transformers serve vs mlflow models serve -> bench/results/generation_serving.{md,json}
	$(PY) bench/generation_serving.py $(ARGS)

bench-llm-runtimes: install  ## a 135M-shape Llama: llmops serve (torch fp32 / int8, GGUF q8_0 / q4_K_M, OpenVINO int8 / int4) vs llama-server -> bench/results/llm_runtimes.{md,json}
	bash scripts/build-llama-cpp.sh $(LLAMA_CPP_PIN) $(VENV)/llama-server $(PY) peer
	$(PY) bench/llm_runtimes.py $(ARGS)

bench-llm-lifecycle: install  ## the generative lifecycle at ~10M, 135M and 0.5B: each stage's time and peak memory -> bench/results/llm_lifecycle.{md,json}
	$(PY) bench/llm_lifecycle.py $(ARGS)

bench-serving: install  ## our server (batching on/off) vs mlflow models serve -> bench/results/serving.{md,json}
	$(PY) bench/serving.py --config $(CONFIG)

bench-monitoring: install  ## report time for a 5k window vs 5k reference, next to scoring time -> bench/results/monitoring.md
	$(PY) bench/monitoring.py --config $(CONFIG)

bench-scale: install  ## batch inference in-process and on Ray (then --lifecycle, --serve, --monitor sections) -> bench/results/scale.md
	$(PY) bench/scale.py --config $(CONFIG)

monitor: install  ## one monitoring pass over predictions.db: report under reports/, decision, retraining if decided
	$(VENV)/bin/llmops monitor --config $(CONFIG)

drift-demo: install  ## the scripted drift scenario: serve, replay, drift, retrain once, promote, drift resolved
	$(PY) -m cli.drift_demo

evidently-ui: install  ## Evidently UI on the monitoring workspace, 127.0.0.1:8001
	$(VENV)/bin/evidently ui --workspace evidently-workspace --host 127.0.0.1 --port 8001

up: install  ## the local stack on loopback: MLflow :5000, Prefect :4200 (+ worker, deployments), serving :8000, Evidently :8001
	$(VENV)/bin/llmops up --config $(CONFIG) $(ARGS)

down:  ## stop exactly what `make up` started
	$(VENV)/bin/llmops down $(ARGS)

serve: install  ## the HTTP API on 127.0.0.1:8000, following the registry's champion
	$(VENV)/bin/llmops serve --config $(CONFIG)

rollback: install
	$(VENV)/bin/llmops rollback --config $(CONFIG)

mlflow-ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --port 5000

lock:  ## refreeze requirements.lock from the current .venv
	{ echo "# Full pinned tree, frozen from a working install (make lock). torch first: see the Makefile."; \
	  $(PIP) freeze | sed 's/^torch==2.13.0+cpu/torch==2.13.0/' | grep -v -E "^(-e|llmops|# Editable)"; } > requirements.lock

clean:  ## remove what runs leave behind (not the venv)
	rm -rf artifacts mlartifacts mlflow.db .prefect
