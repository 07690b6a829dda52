"""The one exception type for mistakes a user can fix.

The CLI prints a `KvcError` as one line and exits with code 2; anything else is a bug
and keeps its traceback. It lives in `policies` because every part of kvc imports it.
"""


class KvcError(Exception):
    """A user error: bad input, a missing file, an impossible request."""
