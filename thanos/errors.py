"""The base of every error this tool raises on purpose.

Each one says what went wrong and what to do instead, so the CLI prints its message alone; any
other exception (a CUDA out-of-memory, a bug) keeps its traceback.
"""


class ThanosExportError(Exception):
    """An error with a message that names the fix."""


class InputError(ThanosExportError, ValueError):
    """A bad argument or input file that fits no narrower class."""
