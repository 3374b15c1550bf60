# Two entry points: `make run` (install what is missing, then build and evaluate the embedded
# default through DVC) and `make test`. Everything runs offline.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
ARTWORK := .cache/emoji-datasource-google
ARTWORK_VERSION := 16.0.0
TORCH_VERSION := 2.13.0
OPEN_CLIP_VERSION := 3.3.0

export HF_HUB_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect
# dvc.yaml's `python -m stages.<name>` must find the project's interpreter.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

# The official diffusers examples (the baselines in benchmarks/ and tests/test_peer_examples.py)
# import torchvision, which only exists here beside torch 2.14.1 (a CUDA build, about 5.5 GB,
# that runs on the CPU): they get their own environment and never share the project's.
PEERS_VENV ?= .venv-peers
PEERS_TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install artwork peers browser run test prefect-up prefect-down clean-checkpoints

install: $(VENV)/.installed artwork

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch, pinned: a bare `torch` requirement would pull the CUDA build.
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# open_clip only for its BPE vocabulary; its torchvision dependency breaks the CPU torch.
	$(PY) -m pip install -q --no-deps open-clip-torch==$(OPEN_CLIP_VERSION)
	touch $@

artwork: $(ARTWORK)/emoji.json

$(ARTWORK)/emoji.json:
	mkdir -p .cache/npm-pack
	cd .cache/npm-pack && npm pack --silent emoji-datasource-google@$(ARTWORK_VERSION) >/dev/null
	rm -rf $(ARTWORK) .cache/npm-pack/package
	tar -xzf .cache/npm-pack/emoji-datasource-google-$(ARTWORK_VERSION).tgz -C .cache/npm-pack
	mv .cache/npm-pack/package $(ARTWORK)
	rm -rf .cache/npm-pack

peers: $(PEERS_VENV)/.installed

$(PEERS_VENV)/.installed: constraints.txt
	test -x $(PEERS_VENV)/bin/python || python3 -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install -q $(PEERS_TORCH)
	# peft for the DreamBooth LoRA example (benchmarks/customize_speed.py)
	$(PEERS_VENV)/bin/python -m pip install -q -c constraints.txt diffusers transformers accelerate datasets peft
	touch $@

# Debian's chromium for the browser test of the Prefect UI (Playwright drives it; no browser
# download from a CDN).
browser:
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# The local Prefect server (127.0.0.1:4200, UI included), the cpu and gpu work pools and their
# workers, and the deployments of prefect.yaml; prefect-down stops them.
prefect-up: install
	$(PY) -m pipelines.server up

prefect-down:
	$(PY) -m pipelines.server down

run: install
	$(VENV)/bin/dvc repro
	$(PY) -m pipelines.report

# One pytest worker per core, each on one thread (tests/conftest.py); a test file stays on one
# worker, so its module fixtures (a tiny world, a DVC repo, a Prefect server) are built once.
TEST_WORKERS ?= auto

test: install peers browser
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean-checkpoints:
	rm -rf checkpoints
