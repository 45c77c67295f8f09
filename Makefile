# HeadScope: `make run` starts the app, `make test` runs every test.  Both set up .venv first.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PORT    ?= 8501
MODEL   ?= smollm2
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test bench browser clean-cache
KERNEL  := $(VENV)/.fused-built

$(STAMP): requirements.txt requirements-nodeps.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

# The fused capture kernels (capture/engine/fused.cpp), compiled once here rather than on the first
# capture; without a C++ compiler this prints why, and captures use slower torch ops.
$(KERNEL): $(STAMP) capture/engine/fused.cpp
	$(PY) -m capture.engine.fused
	touch $(KERNEL)

# Debian's chromium for the real-browser tests (never `playwright install`: no downloads here).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; \
	fi
	@/usr/bin/chromium --version

run: $(STAMP) $(KERNEL)
	HEADSCOPE_DEFAULT_MODEL=$(MODEL) $(PY) -m streamlit run app.py --server.address 127.0.0.1 \
		--server.port $(PORT) --server.headless true --browser.gatherUsageStats false

test: $(STAMP) $(KERNEL) browser
	$(PY) -m pytest

# Peers the benchmarks compare against (not needed to run or test HeadScope).  bertviz --no-deps:
# its declared boto3/requests are unused by model_view.  transformer-lens 4.3 keeps this torch and
# transformers (checked), but brings wandb, datasets and OpenTelemetry along: bench/peers.py only.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP) $(KERNEL)
	$(PY) -m pip install -q ipython==8.12.3
	$(PY) -m pip install -q --no-deps bertviz==1.4.1
	$(PY) -m pip install -q transformer-lens==4.3.0
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) bench/capture.py
	$(PY) bench/app.py
	$(PY) bench/analytics.py
	$(PY) bench/intervene.py
	$(PY) bench/vit.py
	$(PY) bench/dit.py
	$(PY) bench/patterns.py
	nice -n 19 $(PY) bench/peers.py

clean-cache:
	rm -rf cache_data
