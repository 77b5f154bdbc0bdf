# The single source of truth for building, testing, measuring and installing mpubsub.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCES := mpubsub mpubsubd tests benchmarks examples
# The exact versions of the daemon's dependencies: what make install ships
# and what the venv (and its wheels, make install's offline source) holds.
CONSTRAINTS := packaging/constraints.txt

# make install: a self-contained copy of the package and its daemon's
# dependencies under $(LIBDIR), run by the system's Python (as systemd
# would run it: not a Python under /root or /home).
PREFIX ?= /usr/local
SYSCONFDIR ?= /etc
UNITDIR ?= $(PREFIX)/lib/systemd/system
# systemd-sysusers reads /usr/local/lib/sysusers.d as well as /usr/lib's
# (systemd-sysusers --cat-config), as systemd reads the units of UNITDIR.
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
INSTALL_PYTHON ?= /usr/bin/python3
LIBDIR := $(PREFIX)/lib/mpubsub
DESTDIR ?=
# make install creates the system user mpubsub, whom the daemon becomes, on
# this host only: never into a DESTDIR staged for another.
CREATE_USER ?= $(if $(DESTDIR),no,yes)
# A folder of wheels for make install to take everything from, offline: the
# tests give it $(VENV)/wheels, filled when the venv is made (the daemon's
# dependencies and what builds the package, as [build-system] requires).
WHEELS ?=
BUILD_REQUIRES := $(shell sed -n 's/^requires = \[\(.*\)\]$$/\1/p' pyproject.toml)

# make run: a broker for a newcomer who is not root, its files in the checkout.
RUNDIR ?= $(CURDIR)/.run

.PHONY: test test-systemd soak lint run bench install uninstall clean

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[test,lint,daemon,federation]'
	rm -rf $(VENV)/wheels  # a version left from before the pins changed is not a pinned one
	$(PY) -m pip wheel --quiet -c $(CONSTRAINTS) --wheel-dir $(VENV)/wheels \
	  '.[daemon,federation]' $(BUILD_REQUIRES)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-systemd: $(STAMP)
	$(PY) -m pytest -m systemd tests/test_systemd.py

# The load and fault tests at ten times the size, and longer fuzzing (minutes).
soak: $(STAMP)
	MPUBSUB_SOAK=1 $(PY) -m pytest --timeout=1800 tests/test_load.py tests/test_protocol.py tests/test_federation.py

lint: $(STAMP)
	$(PY) -m ruff check $(SOURCES)
	$(PY) -m ruff format --check $(SOURCES)
	$(PY) -m mypy

run: $(STAMP)
	@mkdir -p $(RUNDIR)
	@printf '[mpubsubd]\naddress = %s\ncredentials = %s\npidfile = %s\nlog_file = %s\n' \
	  $(RUNDIR)/broker.sock $(RUNDIR)/broker.pckl $(RUNDIR)/mpubsubd.pid $(RUNDIR)/mpubsubd.log \
	  > $(RUNDIR)/mpubsubd.conf
	@echo "Credentials: $(RUNDIR)/broker.pckl. Connect with:"
	@echo "  $(PY) -c \"from mpubsub import NetPubSub; p = NetPubSub.from_file('$(RUNDIR)/broker.pckl'); p.connect(); print(p.flush())\""
	$(VENV)/bin/mpubsubd --foreground -c $(RUNDIR)/mpubsubd.conf

bench: $(STAMP)
	$(PY) benchmarks/run.py $(if $(QUICK),--quick)

# The module of a command's main(), as [project.scripts] names it.
entry_module = $(shell sed -n 's/^$(1) = "\(.*\):main"$$/\1/p' pyproject.toml)

# $(call install-wrapper,COMMAND): COMMAND on PATH. It runs as root wherever
# root stands: -m would put the working directory first on sys.path, so the
# interpreter runs isolated (-I) and is given LIBDIR itself.
define install-wrapper
	printf '%s\n' '#!/bin/sh' \
	  "# $(1), as installed by mpubsub's make install. Isolated (-I): it imports" \
	  '# nothing from the working directory and ignores PYTHON* variables.' \
	  'exec $(INSTALL_PYTHON) -I -c '"'"'import sys; sys.path.insert(0, "$(LIBDIR)"); from $(call entry_module,$(1)) import main; main()'"'"' "$$@"' \
	  > "$(DESTDIR)$(PREFIX)/bin/$(1)"
	chmod 755 "$(DESTDIR)$(PREFIX)/bin/$(1)"
endef

# $(call install-unit,FILE): a unit of packaging/systemd/, run from PREFIX on the
# configuration in SYSCONFDIR.
define install-unit
	sed -e 's|/usr/local/bin/mpubsubd|$(PREFIX)/bin/mpubsubd|g' \
	  -e 's|/etc/mpubsub/|$(SYSCONFDIR)/mpubsub/|g' packaging/systemd/$(1) \
	  > "$(DESTDIR)$(UNITDIR)/$(1)"
	chmod 644 "$(DESTDIR)$(UNITDIR)/$(1)"
endef

# $(call install-config,SOURCE,TARGET,MODE,NEW): SOURCE as TARGET, unless an
# administrator edited TARGET: then it stays, and SOURCE goes beside it as NEW.
# TARGET is edited if it is neither SOURCE nor what the last make install
# shipped (kept in SHIPPED, as dpkg keeps a conffile's checksum): an upgrade
# replaces a file nobody edited, silently.
define install-config
	if [ -e "$(2)" ] && ! cmp -s "$(1)" "$(2)" && \
	    ! cmp -s "$(SHIPPED)/$(notdir $(1))" "$(2)"; then \
	  install -m $(3) "$(1)" "$(4)"; \
	  echo "kept your $(2); the new one is $(4): merge what you need"; \
	else \
	  install -m $(3) "$(1)" "$(2)"; \
	fi
	install -D -m 644 "$(1)" "$(SHIPPED)/$(notdir $(1))"
endef

# An edited configuration keeps its place and the new one goes beside it: as
# .dist, or .dpkg-dist in logrotate.d, since logrotate reads every file there but
# those with an extension of its taboo list (a mpubsubd.dist would fail each rotation).
CONF := $(DESTDIR)$(SYSCONFDIR)/mpubsub/mpubsubd.conf
SHIPPED := $(DESTDIR)$(LIBDIR)/shipped
LOGROTATE := $(DESTDIR)$(SYSCONFDIR)/logrotate.d/mpubsubd

install:
	$(INSTALL_PYTHON) -m pip install --quiet --root-user-action=ignore --no-compile --upgrade \
	  $(if $(WHEELS),--no-index --find-links "$(WHEELS)") -c $(CONSTRAINTS) \
	  --target "$(DESTDIR)$(LIBDIR)" '.[daemon,federation]'
	install -d "$(DESTDIR)$(PREFIX)/bin"
	$(call install-wrapper,mpubsubd)
	$(call install-wrapper,mpubsub)
	install -d "$(DESTDIR)$(UNITDIR)"
	$(call install-unit,mpubsubd.service)
	$(call install-unit,mpubsubd@.service)
	install -d "$(DESTDIR)$(SYSUSERSDIR)"
	install -m 644 packaging/sysusers.d/mpubsub.conf "$(DESTDIR)$(SYSUSERSDIR)/mpubsub.conf"
	install -d "$(DESTDIR)$(SYSCONFDIR)/mpubsub" "$(DESTDIR)$(SYSCONFDIR)/logrotate.d"
	$(call install-config,etc/mpubsubd.conf,$(CONF),640,$(CONF).dist)
	$(call install-config,etc/logrotate.d/mpubsubd,$(LOGROTATE),644,$(LOGROTATE).dpkg-dist)
# The user: by systemd-sysusers, from the file it reads at boot; else by Debian's adduser.
ifeq ($(if $(DESTDIR),no,$(CREATE_USER)),yes)
	if command -v systemd-sysusers >/dev/null; then \
	  systemd-sysusers "$(SYSUSERSDIR)/mpubsub.conf"; \
	else \
	  adduser --system --group --no-create-home --home /nonexistent \
	    --gecos "mpubsub broker" mpubsub; \
	fi
endif

uninstall:
ifeq ($(DESTDIR),)
	# Stopped before their files go; "not loaded" is no error here.
	if [ -d /run/systemd/system ]; then \
	  systemctl disable --now mpubsubd.service 2>/dev/null || true; \
	  systemctl stop 'mpubsubd@*.service' 2>/dev/null || true; \
	  systemctl disable mpubsubd@.service 2>/dev/null || true; \
	fi
endif
	if cmp -s "$(SHIPPED)/mpubsubd" "$(LOGROTATE)" || cmp -s etc/logrotate.d/mpubsubd "$(LOGROTATE)"; then \
	  rm -f "$(LOGROTATE)"; \
	elif [ -e "$(LOGROTATE)" ]; then \
	  echo "kept your edited $(LOGROTATE) (remove it by hand if unwanted)"; \
	fi
	rm -rf "$(DESTDIR)$(LIBDIR)"
	rm -f "$(DESTDIR)$(PREFIX)/bin/mpubsubd" "$(DESTDIR)$(PREFIX)/bin/mpubsub" \
	  "$(DESTDIR)$(UNITDIR)/mpubsubd.service" "$(DESTDIR)$(UNITDIR)/mpubsubd@.service" \
	  "$(DESTDIR)$(SYSUSERSDIR)/mpubsub.conf" "$(LOGROTATE).dpkg-dist"
ifeq ($(DESTDIR),)
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
endif
	@echo "kept $(DESTDIR)$(SYSCONFDIR)/mpubsub$(if $(DESTDIR),, and the user mpubsub (userdel mpubsub removes it))"

clean:
	rm -rf $(VENV) .bench-venv .run build *.egg-info .pytest_cache .mypy_cache .ruff_cache
