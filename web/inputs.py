"""What a request carries: uploaded files are held in memory, never spooled to a temporary file,
and text is checked before any view runs: control characters (NUL above all) in query parameters
or form fields are refused with 400.

PostgreSQL cannot store or compare a NUL in text, so `/history?class=%00` or a NUL in the log-in
name failed there as a 500 (SQLite took them); no form field or filter of this app needs control
characters other than tab and line breaks.
"""

from __future__ import annotations

import io
import re

from flask import Flask, Request, request
from werkzeug.exceptions import BadRequest

# C0 controls but tab, line feed and carriage return; DEL; the C1 controls.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


class InMemoryRequest(Request):
    """Werkzeug spools multipart files over 500 KB to a temporary file; here every uploaded file
    stays in memory. MAX_CONTENT_LENGTH bounds what one request can hold."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


def refuse_control_characters() -> None:
    """before_request: 400 when a query parameter or form field, name or value, holds a control character."""
    fields = [*request.args.items(multi=True)]
    if request.method in ("POST", "PUT", "PATCH"):
        fields += request.form.items(multi=True)
    for name, value in fields:
        if CONTROL_CHARACTERS.search(name) or CONTROL_CHARACTERS.search(value):
            raise BadRequest(f"The field {name[:40]!r} holds a control character, which no field here accepts.")


def init_app(app: Flask) -> None:
    app.request_class = InMemoryRequest
    app.before_request(refuse_control_characters)
