"""The one error type for problems with the user's input (bits, checkpoints, data, flags).

The scripts print it as one line, `error: ...`, and exit with status 2 (cli.run); anything
else is a bug and keeps its traceback.
"""


class IntsimError(ValueError):
    """A problem with the user's input: the message names it and says what to do."""
