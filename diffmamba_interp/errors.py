"""The one exception type the CLI turns into a one-line message (no traceback)."""


class DiffMambaError(ValueError):
    """A problem with the user's input: a path, a checkpoint, a data spec, a token id.

    The message is one line that names the offending thing. Subclasses ValueError so callers that
    expect ValueError for bad arguments keep working.
    """


def one_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, shortened (the exception's type name if it has none):
    for quoting a library's error inside ours, and for the CLI's one-line errors."""
    text = str(e).strip().splitlines()[0].strip() if str(e).strip() else ""
    text = text or type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
