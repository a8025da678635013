"""Plain data describing where each tensor's bytes are and in what order they are fetched."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file; offsets are absolute positions in the file."""

    name: str
    dtype: str  # safetensors dtype code: "F32", "BF16", "I64", ...
    shape: tuple[int, ...]
    file: str  # storage key of the file that holds it
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class FileHeader:
    """A validated safetensors header plus what storage said about the object."""

    key: str
    size: int
    version: str | None
    data_offset: int  # 8 + header length: where tensor data begins
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)
    raw: bytes = b""  # the file's first data_offset bytes (length prefix and JSON header)


@dataclass(frozen=True)
class ReadRange:
    """One storage read: bytes [start, end) of ``file``; completing it helps land ``shards``."""

    file: str
    start: int
    end: int
    shards: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Shard:
    """The tensors one planned module needs; it has landed when all its reads are done."""

    index: int
    module: str  # qualified module name ("" is the root module)
    tensors: tuple[str, ...]  # checkpoint names
    reads: tuple[int, ...]  # indices into Plan.reads
    nbytes: int


@dataclass(frozen=True)
class Plan:
    """Execution-ordered shards and the coalesced reads that fetch them."""

    modules: tuple[str, ...]  # planned modules in execution order
    shards: tuple[Shard, ...]
    reads: tuple[ReadRange, ...]
    order_source: str  # "dry-forward", "registration" or "given"
    # Planned modules the dry forward never called: their weights may be read by other code,
    # so a gated forward waits for them before it starts.
    uncalled: tuple[str, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)
