"""User-facing failure families. The CLI prints each as one line and exits with code 2."""


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
