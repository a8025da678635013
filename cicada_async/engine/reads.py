"""How large the engine's storage reads are: shared by the plan that makes them and the landing
that holds them. A bottom module: it imports nothing."""

from __future__ import annotations

DEFAULT_READ_BYTES = 8 << 20
# Gaps up to this are read rather than skipped: one request beats two on every backend.
MAX_GAP_BYTES = 256 << 10
