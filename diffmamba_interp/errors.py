"""The one exception type the CLI turns into a one-line message (no traceback)."""


class DiffMambaError(ValueError):
    """A problem with the user's input: a path, a checkpoint, a data spec, a token id.

    The message is one line that names the offending thing. Subclasses ValueError so callers that
    expect ValueError for bad arguments keep working.
    """
