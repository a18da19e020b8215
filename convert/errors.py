class ConversionError(Exception):
    """A user-facing problem with a checkpoint (missing files, weights, shapes, paths).
    The message says what is wrong and how to fix it; the CLI prints it without a traceback."""
