"""Heavy imports with Python's cyclic garbage collector paused, their objects frozen after.

Importing torch and transformers creates ~350,000 container objects. Each one counts towards
the collector's allocation threshold, so the collector runs over and over during the import
and every older-generation pass walks everything imported so far. Measured on this project's
2-core machine (torch 2.13, transformers 5.25, a fresh ``python`` doing ``import torch; from
transformers import GPT2LMHeadModel, BertModel``, 3 runs each, alternated): 858 collections
took 0.62-0.63 s of the 3.04-3.11 s; with the collector paused the same imports took
2.38-2.57 s. Nothing is stubbed or skipped: every module is imported as usual, only the
collector's passes are left out.

Left alone, the pause would only move that cost: the first collection after ``gc.enable()``
walks every object allocated while it was off (0.19-0.20 s measured), and each later
older-generation pass walks them again. So an outermost scope that imported modules ends with
``gc.freeze()``: what is alive then (the modules, classes and functions just imported) goes to
the permanent generation, which no collection walks. The price is that an object alive at that
moment which later becomes part of an unreachable cycle is never reclaimed (reference counting
still frees everything else: a GPT-2 or BERT model leaves no cycle when dropped, checked with
``gc.collect()``). Such scopes are few per process: the start's imports; a scope that imported
nothing only resumes the collector.

An import inside a load (a model class's first use, from the skeleton build) pauses without
freezing (``freeze=False``): freezing there froze objects of the load in flight (its skeleton
build's frame among what kept the mapping reachable, in a cycle the collector frees otherwise),
and an unloaded model's weight file then stayed mapped for the life of the process (a fresh
process loading tiny-gpt2 with transformers first imported inside the build: the file was still
in /proc/self/maps after the unload and ``gc.collect()``; with the collector alone it was not). Pausing alone keeps most of the gain: the collector's passes during
the import; the objects it made are walked once by a later older-generation pass.

What the imports cost beyond the collector, and why none of it is skipped, is in
``docs/process-start.md``: ``torch._dynamo`` (with sympy, ``torch.distributed.tensor`` and
FSDP, ~1 s of the 3) is imported by transformers' masking utilities and a
``@torch.compiler.disable`` decorator at import time, unconditionally.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0  # scopes open in any thread
_resume = False  # whether the outermost scope found the collector on (and so turns it back on)
_modules = 0  # len(sys.modules) when the outermost scope began
_no_freeze = False  # a scope of this stretch ran inside a load: nothing is frozen at its end


@contextmanager
def paused(*, freeze: bool = True) -> Iterator[None]:
    """The collector off for the scope (any thread, nested); at the outermost end, resume it.

    The outermost end first freezes what is alive when modules were imported in the scope,
    unless a scope of the stretch said ``freeze=False`` (an import inside a load). A collector
    the application had disabled stays disabled, and nothing is frozen then.
    ``CICADA_IMPORT_GC=on`` leaves the collector alone (to compare, or should a leak show).
    """
    global _depth, _resume, _modules, _no_freeze
    if os.environ.get("CICADA_IMPORT_GC", "").lower() in ("on", "1"):
        yield
        return
    with _lock:
        if _depth == 0:
            _resume, _modules, _no_freeze = gc.isenabled(), len(sys.modules), False
            gc.disable()
        _depth += 1
        _no_freeze = _no_freeze or not freeze
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _resume:
                if len(sys.modules) > _modules and not _no_freeze:
                    gc.freeze()
                gc.enable()
