"""The one exception type that the command line turns into a single error line and exit code 2."""


class CalofmError(Exception):
    """Bad input or an impossible request: shown to the user as one line, without a traceback."""
