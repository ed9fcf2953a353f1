"""One exception type for every user-facing failure.

Raise `ChimeraError("file/tensor: what is wrong")` with a single line that names the file or tensor.
The command line prints it as `error: ...` and exits with status 2 (no traceback).
"""


class ChimeraError(Exception):
    """A bad input or a failed check, explained in one line."""
