"""Shared fixtures. Fixture groups live in their own modules and are registered here."""

import atexit
import os
import shutil
import tempfile

# Bit-exact comparisons across processes (the CLI and server tests compare a subprocess's
# outputs with this process's) need MKL's conditional numerical reproducibility: by default
# MKL may choose kernels by buffer alignment, which differs from process to process. Set
# before anything imports torch; subprocesses inherit it.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

# Plan files of remote models go under $XDG_CACHE_HOME/cicada/plans (engine/plancache.py): a
# test run, and the servers it spawns, keep theirs in a directory of their own, not in ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="cicada-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)

pytest_plugins = ["tests.fixtures.models", "tests.fixtures.storage", "tests.fixtures.server"]
