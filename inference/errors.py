"""The user-facing error of inference: what to fix, in one line. `demo.py` prints it as
"error: ..." without a traceback and exits with status 2."""


class InferenceError(Exception):
    """A user error (bad option, input, model folder): printed as one line, no traceback."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors can run over many lines)."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
