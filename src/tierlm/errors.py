"""User-facing failure families. The CLI prints each as one line and exits with code 2."""
from __future__ import annotations

import errno


class TierlmError(Exception):
    """Base of every error a user can cause (bad file, bad value, too long a prompt)."""


class ModelFormatError(TierlmError):
    """The file is missing, is not a model, is truncated, or its contents are inconsistent."""


class UnsupportedModelError(TierlmError):
    """A well-formed model that tierlm cannot run (architecture, quant type, rope scaling)."""


class UsageError(TierlmError):
    """A bad argument value: negative max tokens, top_p out of range, unknown dtype, ..."""


class ContextLengthError(TierlmError):
    """The prompt (plus requested tokens) does not fit the model's context window."""


class BudgetError(TierlmError):
    """The memory budget cannot hold the minimum the model needs (the message says how much that is)."""


class KVCacheFullError(BudgetError):
    """A request needs more KV blocks than the whole KV pool holds (raise kv_memory)."""


class StorageError(TierlmError):
    """A file tierlm writes cannot be written: disk full, permission denied, read-only filesystem. The message
    names the path and what happened (and, for a full disk, how much was needed and how much is free)."""


# OSErrors that mean "this storage will not take the write" (not a bug): reported as a StorageError.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS})


def is_storage_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in STORAGE_ERRNOS


def storage_error(what: str, e: OSError, note: str = "") -> StorageError:
    """One line: `cannot write <what>: <strerror>[ (<note>)]`, e.g. cannot write the offload store in /x: No space
    left on device (needs 3.2 GiB, 1.1 GiB free)."""
    return StorageError(f"cannot write {what}: {e.strerror or e}" + (f" ({note})" if note else ""))
