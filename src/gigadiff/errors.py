"""User-facing errors.

Everything a user can get wrong (sizes, paths, model names, options) raises `GigadiffError` *before* any
model is run. The CLI turns it into a one-line message and exit code 2; the Python API lets it propagate.
It subclasses `ValueError` so callers that already catch bad arguments keep working.
"""


class GigadiffError(ValueError):
    """A problem with the user's input or environment, reported before compute starts."""
