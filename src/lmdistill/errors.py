"""User-facing errors.

`LmdistillError` is for bad input a user can fix (a malformed record, an unknown flag value, mismatched
shapes). The CLI prints its message as one paragraph without a traceback and exits 1; library callers get
an ordinary exception. Messages say what was expected, what was found, and where (file:line, flag name).
"""


class LmdistillError(ValueError):
    """An error caused by the user's input, with a message meant to be read by that user."""
