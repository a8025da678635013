"""Shared fixtures. Fixture groups live in their own modules and are registered here."""

import atexit
import os
import shutil
import tempfile

import pytest

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


# The service suite skips its modules when tritonclient, kserve, openai or ray[serve] is missing
# (importorskip, a module-level skip), which is right on a laptop without the test extra and
# wrong in CI: there a missing client would silently skip the suite. With $CI set, a missing
# client stops the run instead.
CI_CLIENTS = ("tritonclient.http", "tritonclient.grpc", "kserve", "openai", "ray.serve")


def pytest_configure(config: "pytest.Config") -> None:
    if not os.environ.get("CI"):
        return
    import subprocess
    import sys

    missing = []
    for name in CI_CLIENTS:
        # Imported in a child each: kserve and tritonclient.grpc register the same protobuf
        # package and cannot share a process (tests/service/grpc_probe.py), and a package that
        # is present but broken must count as missing.
        child = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, timeout=120)
        if child.returncode != 0:
            missing.append(name)
    if missing:
        raise pytest.UsageError(f"CI is set but {', '.join(missing)} cannot be imported: install the test "
                                "extra (pip install -e '.[test]'); in CI the service tests must run, not skip")
