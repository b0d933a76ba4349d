# hpcrun: `make demo` and `make test` work on a fresh Debian 12 machine as root.
# Everything they need is installed here: Debian packages, then a venv (built on
# Debian's /usr/bin/python3, so an unprivileged test user can run it) with
# hpcrun installed the way users get it: an sdist, a wheel built from that
# sdist, the wheel pip-installed.  The tests run against that install, never
# against this source tree.  See README.md.

PYTHON   ?= /usr/bin/python3
VENV     ?= .venv
APT_PKGS  = squashfs-tools squashfuse fuse3 libsquashfuse-dev libfuse3-dev openmpi-bin libopenmpi-dev busybox-static \
            charliecloud-runtime slurm-wlm slurmctld slurmd slurm-client munge libslurm-dev \
            libpmix-dev python3-venv python3-dev gcc make util-linux lua5.1 openssh-client gpgv gpg gpg-agent \
            zstd podman skopeo runc strace
STAMP     = $(VENV)/.installed

.PHONY: all deps venv test demo demo-slurm demo-pbs pbs bench bench-quick plugins clean

all: venv plugins

deps: .deps-stamp
.deps-stamp:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(filter-out %-,$(APT_PKGS)); do \
	    dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  fi; \
	else echo "not root or no apt-get: assuming the Debian packages in the Makefile are installed"; fi
	@# Unprivileged squashfuse needs /dev/fuse open to users (Debian's default is 0666;
	@# some container hosts create it 0600).  FUSE mounts by users stay nosuid,nodev.
	@if [ "$$(id -u)" = 0 ] && [ -c /dev/fuse ]; then chmod 0666 /dev/fuse; fi
	@touch $@

# The venv's tools (pytest, mpi4py, build ...), installed once.
venv: $(STAMP)
$(VENV)/.base: .deps-stamp setup.cfg pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q build setuptools wheel pytest pytest-mpi mpi4py psutil matplotlib
	@touch $@

# hpcrun itself, reinstalled from a fresh wheel whenever a packaged file
# changed.  flock: several `make test` may run at once (one venv).
PKG_FILES = $(shell git ls-files hpcrun 2>/dev/null || find hpcrun -type f) setup.cfg pyproject.toml MANIFEST.in
$(STAMP): $(VENV)/.base $(PKG_FILES)
	flock $(VENV)/.lock sh -c '\
	  rm -rf .whl && $(VENV)/bin/python -m build -q --no-isolation --outdir .whl . >/dev/null && \
	  $(VENV)/bin/pip install -q --force-reinstall --no-deps .whl/hpcrun-*.whl && \
	  rm -rf build hpcrun.egg-info'
	@# Unprivileged users cannot write __pycache__ in the venv: compile now, or every rank recompiles.
	$(VENV)/bin/python -m compileall -q $$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/hpcrun >/dev/null
	@# The install step users take after pip (docs/install.md): bin/hpcrun starts Python with -I -S
	@# and loads the rank's modules from one file.  Last: the bundle records the package's state.
	@# With gcc (APT_PKGS) it also compiles the join-only front: bin/hpcrun, the Python entry bin/hpcrun-py.
	$(VENV)/bin/hpcrun install-entry >/dev/null
	@touch $@

plugins: .deps-stamp
	$(MAKE) -C plugins/slurm

# A real OpenPBS for tests/test_pbs_e2e.py and demo-pbs: built once per machine
# from ../shared/vendor/openpbs into /opt/pbs (minutes), again only when the
# archive changes.  Root only (it installs Debian packages and runs PBS's daemons).
pbs: .deps-stamp
	@if [ "$$(id -u)" = 0 ]; then $(PYTHON) tests/testbed/pbs.py build; \
	else echo "not root: the PBS tests will be skipped"; fi

# TESTS selects (make test TESTS="tests/test_core.py -k bind").  pytest is
# started from tests/ so that `import hpcrun` finds the installed wheel.
TESTS ?= .
test: venv plugins pbs
	cd tests && $(abspath $(VENV))/bin/python -m pytest -q $(patsubst tests/%,%,$(TESTS))

demo: venv
	$(VENV)/bin/python tests/demo.py

demo-slurm: venv plugins
	$(VENV)/bin/python tests/testbed/demo.py

demo-pbs: venv pbs
	$(VENV)/bin/python tests/testbed/pbs_demo.py

# As root, the entry benchmark runs as an unprivileged user: the path users take.
BENCH_USER = $(shell [ "$$(id -u)" = 0 ] && { id hpcrun-test >/dev/null 2>&1 || \
               useradd --create-home --shell /bin/sh hpcrun-test; } && echo --user hpcrun-test)

bench: venv
	$(VENV)/bin/python benchmarks/run.py $(BENCH_USER)

bench-quick: venv
	$(VENV)/bin/python benchmarks/run.py --quick $(BENCH_USER)

clean:
	rm -rf $(VENV) .deps-stamp build *.egg-info .whl
	-$(MAKE) -C plugins/slurm clean
