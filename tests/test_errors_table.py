"""One error table: every code the app or its front door answers has its status in STATUS_BY_CODE.

Errors carry codes (app_errors.AppError); web/errors.py's STATUS_BY_CODE is the only map from
code to HTTP status, and nginx's own JSON answers (deploy/nginx.conf.template) must agree with it.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import app  # noqa: F401  (loads every module that defines an error)
import cli  # noqa: F401
from app_errors import AppError
from web.errors import STATUS_BY_CODE

ROOT = Path(__file__).resolve().parent.parent
NGINX_TEMPLATE = ROOT / "deploy" / "nginx.conf.template"


def error_classes() -> dict[str, type[AppError]]:
    """Every subclass of AppError the app defines, by class name."""
    found, pending = {}, [AppError]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return found


def raised_codes(class_names: set[str]) -> dict[str, str]:
    """code -> where, for each literal code passed to an error class in the project's source."""
    codes = {}
    for path in [*ROOT.glob("*.py"), *ROOT.glob("web/*.py"), *ROOT.glob("training/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            given = [*node.args[1:2], *(k.value for k in node.keywords if k.arg == "code")]
            if name in class_names:
                for value in given:
                    if isinstance(value, ast.Constant) and isinstance(value.value, str):
                        codes[value.value] = f"{path.relative_to(ROOT)}:{node.lineno}"
    return codes


def test_every_error_code_the_app_raises_has_a_status_in_the_table():
    classes = error_classes()
    domain = {"ImageError", "ModelOutputError", "ModelStoreError", "AccountError", "HistoryError", "NoExplanation"}
    assert {*domain, "WebError"} <= set(classes)
    codes = {cls.code: name for name, cls in classes.items()} | raised_codes(set(classes))
    assert {"too_many_pixels", "no_model", "unknown_class"} <= codes.keys()  # the scan sees raises
    assert {code: where for code, where in codes.items() if code not in STATUS_BY_CODE} == {}


def nginx_error_bodies() -> dict[str, int]:
    """code -> status of each JSON error body nginx returns itself."""
    text = NGINX_TEMPLATE.read_text()
    bodies = {}
    for status, body in re.findall(r"return (\d{3}) '(\{\"error\".*?)\\n';", text):
        error = json.loads(re.sub(r"@[A-Z_]+@", "1", body))["error"]
        assert set(error) == {"code", "message"}, body
        bodies[error["code"]] = int(status)
    return bodies


def test_nginx_answers_with_the_apps_codes_and_statuses():
    bodies = nginx_error_bodies()
    assert {"too_large", "rate_limited", "timeout"} <= bodies.keys()
    assert {code: status for code, status in bodies.items() if STATUS_BY_CODE.get(code) != status} == {}
