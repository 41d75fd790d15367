# make smoke: install, build the tiny fixture, train 50 steps on 8 emulated CPU devices, export.
# make test:  install (with the test-only references), run the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TINY := build/tiny
# JAX_PLATFORMS=cpu: with libtpu installed (make test's), JAX would try a TPU first
EIGHT_CPU_DEVICES := JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8

.PHONY: smoke test clean

$(VENV)/.train-installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

$(VENV)/.test-installed: $(VENV)/.train-installed requirements-test.txt requirements-reddit.txt
	$(VENV)/bin/pip install -q -r requirements-test.txt
	touch $@

$(TINY)/data_config.json: $(VENV)/.train-installed scripts/make_tiny_data.py
	$(PY) scripts/make_tiny_data.py $(TINY)

smoke: $(TINY)/data_config.json
	$(EIGHT_CPU_DEVICES) $(PY) train_script.py $(TINY)/data_config.json build/smoke \
		--model $(TINY)/model --data_folder $(TINY)/data --overwrite \
		--steps 50 --batch_size 4 --max_length 32 --lr 1e-3 --warmup_steps 5 \
		--log_steps 10 --save_steps 25 --eval_steps 25 --eval_rows 200
	@echo "exported: build/smoke/final (load it with SentenceTransformer('build/smoke/final'))"

test: $(VENV)/.test-installed
	$(PY) -m pytest -q --durations=15 tests

clean:
	rm -rf build
