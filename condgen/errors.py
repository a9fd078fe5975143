"""`CondgenError`: the base of every error a user should see as one line, without a traceback.

Each part of condgen raises its own subclass (`BundleError`, `ConfigError`, `DataError`, ...),
whose message says what is wrong and what to change. The command line prints any of them as
`error: <message>` and exits with status 2; anything else is a bug and keeps its traceback.
The subclasses also keep the built-in base they had (`ValueError`, `RuntimeError`), so code
that caught those still does.
"""


class CondgenError(Exception):
    """An error whose message is the whole story for the user."""
