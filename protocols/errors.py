"""The one exception hierarchy of cicada-async; every failure a user can see is one of these."""

from __future__ import annotations


class CicadaError(Exception):
    """Base of every error cicada-async raises on purpose; its message is meant for users."""


class ConfigError(CicadaError):
    """A configuration file, option or model directory is invalid."""


class ModelNotFound(CicadaError):
    """The named model is not in the repository."""


class StorageError(CicadaError):
    """Reading from a storage backend failed."""


class StorageTimeout(StorageError):
    """A storage operation did not finish within its timeout."""


class ObjectNotFound(StorageError):
    """The object does not exist in storage."""


class ObjectChanged(StorageError):
    """The object was replaced while it was being read (its version no longer matches)."""


class IntegrityError(StorageError):
    """Bytes read do not match what the header or manifest promised (short body, bad digest)."""


class CheckpointError(CicadaError):
    """A weight file is malformed (bad safetensors header, unsupported format)."""


class WeightMismatch(CicadaError):
    """Checkpoint tensors do not match the model: missing, unexpected or mis-shaped tensors."""


class LoadError(CicadaError):
    """A model could not be loaded for a reason not covered by a more specific error."""


class InferenceError(CicadaError):
    """The model's forward pass failed."""


class BadRequest(CicadaError):
    """An inference request is malformed or does not fit the model."""


class Overloaded(CicadaError):
    """The server is saturated; the request was shed and may be retried later."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(CicadaError):
    """The request's deadline passed before it could be answered."""


class ShuttingDown(CicadaError):
    """The server is draining and admits no new work."""
