"""The one base class of the errors the app answers: each carries a machine-readable `code`.

Domain modules raise subclasses with their code; the web edge (web/errors.py, STATUS_BY_CODE)
alone maps codes to HTTP statuses. Flask-free, so the registry, the predictor and training
raise these without importing the web layer.
"""

from __future__ import annotations


class AppError(Exception):
    """An error with a message for people and a code for programs (`bad_image`, `not_found` ...).

    A subclass names its usual code as a class attribute; a raise may give another."""

    code = "internal"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
