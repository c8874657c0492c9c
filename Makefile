# The two commands a new machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_DIR := run

# Debian packages the suite uses: Chromium for the browser tests (playwright
# never downloads a browser here), logrotate and systemd-analyze to check the
# files in etc/, PostgreSQL for the farm's store (the tests start a server of
# their own with initdb; Debian keeps it in /usr/lib/postgresql/VERSION/bin).
# Installed only when their command is missing.
SYSTEM_PACKAGES := /usr/bin/chromium:chromium /usr/sbin/logrotate:logrotate \
	/usr/bin/systemd-analyze:systemd
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Test processes at once (pytest-xdist): most tests wait on a daemon or a child,
# so two share two cores well (5.8 min against 9.1 min, one at a time).
TEST_WORKERS ?= 2

.PHONY: install system-packages run test bench clean

install: $(STAMP)

$(STAMP): setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

run: install
	@mkdir -p $(RUN_DIR)
	$(BIN)/python -m vfab.demo --workspace $(RUN_DIR)/workspace --config etc/vfab.simulator.yaml

system-packages:
	@missing=""; for entry in $(SYSTEM_PACKAGES); do \
		test -x "$${entry%%:*}" || missing="$$missing $${entry##*:}"; done; \
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
		|| missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; fi

test: install system-packages
	$(BIN)/python -m pytest -p no:cacheprovider -n $(TEST_WORKERS)

bench: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(RUN_DIR) build *.egg-info twisted/plugins/dropin.cache
