"""Shared fixtures. Fixture groups live in their own modules and are registered here."""

import os

# Bit-exact comparisons across processes (the CLI and server tests compare a subprocess's
# outputs with this process's) need MKL's conditional numerical reproducibility: by default
# MKL may choose kernels by buffer alignment, which differs from process to process. Set
# before anything imports torch; subprocesses inherit it.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

pytest_plugins = ["tests.fixtures.models", "tests.fixtures.storage", "tests.fixtures.server"]
