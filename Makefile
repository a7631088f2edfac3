# The README's two commands: `make demo` and `make test`. Both set up everything on a fresh
# Debian machine with Python 3.11 (the virtual environment, the CPU build of torch, the package
# with its GUI and test extras, and the Debian packages for a virtual X server).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
XVFB_PACKAGES := xvfb xauth libgl1 libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-cursor0 \
	libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 \
	libxcb-xinerama0 libxcb-xinput0 libxcb-xfixes0 libxcb-shape0 libdbus-1-3 libfontconfig1

.PHONY: setup demo test lint system-packages clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# The CPU build, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[gui,test]"
	touch $(STAMP)

system-packages:
	@if ! command -v xvfb-run >/dev/null 2>&1 || ! ldconfig -p | grep -q libxcb-cursor.so.0; then \
		echo "Installing the Debian packages for Xvfb"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(XVFB_PACKAGES); \
	fi

# The main job on the bundled default model and sample volume, no display needed.
demo: setup
	$(VENV)/bin/whatishealthy demo --headless --out demo-output

test: setup system-packages
	xvfb-run -a -s "-screen 0 1600x1200x24" $(PY) -m pytest -q -p no:cacheprovider
	$(VENV)/bin/ruff check src tests benchmarks

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) demo-output
