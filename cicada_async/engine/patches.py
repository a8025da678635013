"""Process-wide attribute patches that act only on the threads inside them.

Building a skeleton and the dry forward need torch to behave differently (parameters on meta,
no init, answers for data-dependent checks on meta tensors). Those hooks can only be installed
process-wide, on classes and modules; the wrappers here check a thread-local flag, so a forward
or a model build on any other thread at the same moment sees plain torch.

Why not ``accelerate.init_empty_weights`` with transformers' ``no_init_weights`` (review-3
W-3): they patch the same class attributes process-wide with no thread scope, so a warm
forward or another model's build on an executor worker while a skeleton builds would create
its parameters on meta and skip their init. This engine builds skeletons (prebuilds, refills,
cold starts of other models) while other threads serve, which is the case the thread-local
flag exists for; the patches here are also what the dry forward needs, which accelerate does
not offer.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

Target = tuple[object, str]
# (original, *args, **kwargs) -> result; called only on a thread inside the patch.
Replacement = Callable[..., Any]


class ScopedPatch:
    """Replace ``targets`` while any thread is inside ``active()``; only those threads see it.

    Installs on the first entry and restores on the last exit (reference counted under a lock),
    so overlapping users on different threads never save each other's wrappers as originals.
    """

    def __init__(self, name: str, targets: Callable[[], list[Target]], replacement: Callable[[str], Replacement]):
        self.name = name
        self._targets = targets
        self._replacement = replacement
        self._lock = threading.Lock()
        self._users = 0
        self._saved: list[tuple[object, str, Any]] = []
        self._local = threading.local()

    def here(self) -> bool:
        """Whether the calling thread is inside ``active()``."""
        return getattr(self._local, "depth", 0) > 0

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._install()
            self._users += 1
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield
        finally:
            self._local.depth -= 1
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._restore()

    def _install(self) -> None:
        self._saved = []
        for obj, attr in self._targets():
            orig = getattr(obj, attr, None)
            if not callable(orig):
                continue
            self._saved.append((obj, attr, orig))
            setattr(obj, attr, self._wrap(orig, self._replacement(attr)))

    def _restore(self) -> None:
        for obj, attr, orig in reversed(self._saved):
            setattr(obj, attr, orig)
        self._saved = []

    def _wrap(self, orig: Any, replacement: Replacement) -> Any:
        here = self.here

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if here():
                return replacement(orig, *args, **kwargs)
            return orig(*args, **kwargs)

        wrapper.__wrapped__ = orig  # type: ignore[attr-defined]
        wrapper.__name__ = getattr(orig, "__name__", "patched")
        return wrapper
