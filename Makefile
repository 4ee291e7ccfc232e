# dens: `make test` and `make demo` work from a fresh clone; every install step lives here.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup tools test lint bench bench-gpu demo clean

setup: $(STAMP)

# Reinstall when the dependency list changes. torch/torchvision come from the package index as
# ordinary dependencies (their CUDA wheels also run on CPU machines).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,ray]'
	touch $(STAMP)

# The third-party programs the tests run against, from Debian's packages: Chromium (the review page), Orthanc
# (the PACS) and its DICOMweb plugin (STOW-RS), DCMTK (storescu, storescp, echoscu, dsrdump) and dicom3tools
# (dciodvfy). Installed where this runs as root with apt-get (CI does); elsewhere nothing is installed and the
# tests that need a missing program skip and name it. DENS_NO_TOOLS=1 skips this step.
TOOLS_PACKAGES := chromium orthanc orthanc-dicomweb dcmtk dicom3tools
TOOLS_PROGRAMS := chromium Orthanc storescu dciodvfy
TOOLS_FILES    := /usr/share/orthanc/plugins/libOrthancDicomWeb.so
tools:
	@if [ -n "$$DENS_NO_TOOLS" ]; then exit 0; fi; \
	missing=""; for p in $(TOOLS_PROGRAMS); do command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	for f in $(TOOLS_FILES); do [ -e $$f ] || missing="$$missing $$f"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing $(TOOLS_PACKAGES) (missing:$$missing)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			$(TOOLS_PACKAGES) >/dev/null || echo "warning: apt-get could not install them; their tests will skip"; \
	else \
		echo "not installing$$missing (needs root and apt-get): the tests that use them will skip"; \
	fi

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

test: lint tools
	$(PY) -m pytest -q

# The suite, one JSON per benchmark in bench/results/, then the plot and bench/README.md's table. The
# benchmarks share one full-size synthetic cohort (.cache/bench-cohort, made on first use). About 11-13 minutes
# on a 2-core machine; each one picks the GPU where there is one. Run it on an otherwise idle machine.
bench: setup
	$(PY) bench/decode.py
	$(PY) bench/model_stage.py
	$(PY) bench/pipeline.py
	$(PY) bench/scaling.py
	$(PY) bench/train_step.py
	$(PY) bench/gradcam.py --device auto --models resnet50:512 --batches 1,8 --repeat 2
	$(PY) bench/summarize.py

# The GPU benchmarks and the `pytest -m gpu` tests on a machine with a CUDA GPU: every step time-limited,
# a failed step reported without ending the rest (bench/gpu.sh says what each step measures).
bench-gpu: setup
	PYTHON=$(PY) bash bench/gpu.sh

# The demo runs on any 2-core machine in a few minutes: it trains a small model (resnet18 at S=128,
# from scratch) on a synthetic cohort, not the default ResNet-50 at 512, and says so.
DEMO ?= demo
demo: setup
	@echo "== dens demo: a small synthetic cohort and a small model (resnet18, S=128, random init) =="
	$(VENV)/bin/dens-synth $(DEMO)/cohort --patients 100 --size small --seed 1 --overwrite
	$(VENV)/bin/dens-synth $(DEMO)/studies --patients 6 --size small --seed 2 --overwrite
	rm -rf $(DEMO)/runs/demo $(DEMO)/gradcam  # each demo trains afresh (the decoded cache is kept)
	$(VENV)/bin/dens-train --data $(DEMO)/cohort --out $(DEMO)/runs/demo --arch resnet18 --weights none \
		--size 128 --epochs 6 --batch-size 16 --lr 1e-3 --cache $(DEMO)/.cache --no-progress
	$(VENV)/bin/dens-export --onnx --checkpoint $(DEMO)/runs/demo/best.pt --no-progress
	$(VENV)/bin/dens-infer $(DEMO)/studies --model $(DEMO)/runs/demo/model.onnx --out $(DEMO)/preds.csv --overwrite \
		--gradcam $(DEMO)/gradcam
	@echo "== outputs =="
	@echo "run directory (checkpoints, metrics.json, plots): $(DEMO)/runs/demo"
	@echo "ONNX model and parity report:                      $(DEMO)/runs/demo/model.onnx, model.parity.json"
	@echo "predictions (one row per file):                    $(DEMO)/preds.csv"
	@echo "breast and exam level:                             $(DEMO)/preds.breast.csv, $(DEMO)/preds.exam.csv"
	@echo "Grad-CAM overlays for the flagged (C/D) images:    $(DEMO)/gradcam/, review page $(DEMO)/preds.report.html"

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
