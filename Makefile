# Set-up, serving, tests and training. `make run` and `make test` work on a fresh clone.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
FLASK   := $(VENV)/bin/flask --app app
HOST    ?= 127.0.0.1
PORT    ?= 5000
DEFAULT_MODEL := models/default/model.h5

.PHONY: install db run serve serve-proxy test test-fast lint train evaluate bench bench-suite soak frontdoor-bench drift-reference clean

# The project itself goes in editable (pyproject.toml): scripts import its modules from anywhere.
$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

## db: create the database, import the shipped model when the registry is empty, convert any version the serving engine has no file of (once)
db: install
	$(FLASK) init-db
	$(FLASK) models import $(DEFAULT_MODEL) --name cifar10-default --if-empty
	$(FLASK) models upgrade-files

## run: serve the app with the shipped model on http://$(HOST):$(PORT) (gunicorn, as `serve`)
run: db
	HOST=$(HOST) PORT=$(PORT) MALLOC_ARENA_MAX=$${MALLOC_ARENA_MAX:-2} $(VENV)/bin/gunicorn -c gunicorn.conf.py

## serve: the production server with the environment's settings (WEB_WORKERS, WEB_THREADS, HOST, PORT: gunicorn.conf.py)
serve: db
	MALLOC_ARENA_MAX=$${MALLOC_ARENA_MAX:-2} $(VENV)/bin/gunicorn -c gunicorn.conf.py

## serve-proxy: nginx on PORT (default 8080) in front of gunicorn on instance/gunicorn.sock; Ctrl-C stops both
serve-proxy: db
	HOST=$(HOST) PORT=$(if $(filter file,$(origin PORT)),8080,$(PORT)) MALLOC_ARENA_MAX=$${MALLOC_ARENA_MAX:-2} \
		$(PY) deploy/frontdoor.py

## drift-reference: fit the shipped model's drift reference on its calibration's held-out images (no retraining); writes models/default/drift_reference.safetensors, which `make db` imports with the model
drift-reference: install
	scratch=$$(mktemp -d) && trap 'rm -rf "$$scratch"' EXIT && export INSTANCE_PATH="$$scratch" DATABASE_URL= && \
		$(FLASK) init-db >/dev/null && $(FLASK) models import $(DEFAULT_MODEL) --name cifar10-default >/dev/null && \
		$(FLASK) drift fit-reference 1 --data $(or $(DATA),../shared/data/cifar10-jpeg.tar.gz) --val-fraction 0.1 --seed 0 \
			--out models/default/drift_reference.safetensors

## bench: serving benchmark against the production server (benchmarks/results/serve.json; CALIBRATION=record.json: the cost of calibration for a model without one in metrics.json), then the lean worker against the TensorFlow one, same run (benchmarks/results/lean_worker.json)
bench: install
	$(PY) benchmarks/serve.py --model $(DEFAULT_MODEL) $(if $(CALIBRATION),--calibration $(CALIBRATION))
	$(PY) benchmarks/lean_worker.py --model $(DEFAULT_MODEL)

## bench-suite: time `make test-fast` and `make test` (wall and CPU seconds, with the CPU model and load); BASELINE=REV times that commit too, back to back; writes benchmarks/results/suite_time.json
bench-suite: install
	$(PY) benchmarks/suite_time.py $(if $(BASELINE),--baseline $(BASELINE)) $(if $(TARGETS),--targets $(TARGETS))

## soak: 2,000 mixed requests with an activation and a killed worker; writes benchmarks/results/soak.json
soak: install
	$(PY) benchmarks/soak.py --model $(DEFAULT_MODEL) --kill-worker

## frontdoor-bench: costly inputs through nginx (slowloris, rate, 16-bit bombs, plots), then the soak through nginx with them in its mix; writes benchmarks/results/frontdoor.json and soak-frontdoor.json
frontdoor-bench: install
	$(PY) benchmarks/frontdoor.py --model $(DEFAULT_MODEL)
	$(PY) benchmarks/soak.py --model $(DEFAULT_MODEL) --front-door

# The suite runs in TEST_WORKERS processes (pytest-xdist; a file's tests stay in one process, which
# shares its module fixtures; files handed out heaviest first, as tests/conftest.py orders them);
# TEST_WORKERS=0 runs it in this one. docs/testing.md has the timings.
TEST_WORKERS ?= 2
# Python's byte-code cache for the project's modules and pytest's rewritten tests (git ignores
# __pycache__): an environment that turns it off would have each test process compile them all again.
unexport PYTHONDONTWRITEBYTECODE
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

## test: lint, then the test suite in one session: on SQLite, and the tests that use the database (marked db) on PostgreSQL as well when TEST_DATABASE_URL is set
test: lint
	@if [ -z "$$TEST_DATABASE_URL" ]; then \
		echo "== SQLite only: TEST_DATABASE_URL is not set (.ci/run starts a PostgreSQL server with .ci/start-postgres)"; \
	fi
	$(PYTEST)

## test-fast: lint, then the suite on SQLite without the slow tests (training, gunicorn, nginx, browser, TensorFlow children, simulations over many seeds or requests)
test-fast: lint
	env -u TEST_DATABASE_URL $(PYTEST) -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

## train: retrain the shipped model with train.py's defaults (the airbench94 recipe; fits the hour only on a CPU with AVX-512 BF16, see README)
train: install
	$(PY) train.py --out models/default --verbose 2

## evaluate: evaluate the shipped model on the CIFAR-10 test split
evaluate: install
	$(PY) train.py evaluate $(DEFAULT_MODEL) --out instance/evaluation

clean:
	rm -rf $(VENV) instance
