"""One priority scale, from the wire to the executor and the fetch scheduler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, order=True, slots=True)
class Priority:
    """Where work stands in line: a lower level runs first, on the executor and for reads.

    Requests carry levels 1 (most urgent) and up; the wire's 0 ("the model's default") is
    resolved once, at the edge (``from_wire``). The engine's own work has named levels.
    """

    level: int

    # Named levels (assigned below the class).
    SETUP: ClassVar[Priority]
    """Planning and skeleton work of tools that prepare a model outside any request (pack)."""
    UNLOAD: ClassVar[Priority]
    """Dropping an unloaded model's last reference: ahead of every request, after the forward in flight."""
    MOST_URGENT: ClassVar[Priority]
    """The most urgent level a request can carry."""
    DEFAULT: ClassVar[Priority]
    """A request's level when neither the request nor the model's config names one."""
    IMPORTS: ClassVar[Priority]
    """Warming the model libraries' imports at start: as a default request, never ahead of one."""
    BACKGROUND: ClassVar[Priority]
    """Prebuilt skeletons and their refills: only when no request waits."""

    @classmethod
    def from_wire(cls, value: int, default: Priority) -> Priority:
        """A request's ``priority`` parameter: 0 means ``default`` (the model's), 1 is most urgent."""
        if value < 0:
            raise ValueError(f"a wire priority is 0 or more, got {value}")
        return default if value == 0 else cls(value)

    def __str__(self) -> str:
        return str(self.level)


Priority.SETUP = Priority(-1)
Priority.UNLOAD = Priority(0)
Priority.MOST_URGENT = Priority(1)
Priority.DEFAULT = Priority(10)
Priority.IMPORTS = Priority(10)
Priority.BACKGROUND = Priority(1000)
