"""Click parameter types the `flask` commands share."""

from __future__ import annotations

from datetime import UTC, datetime

import click


class IsoTime(click.ParamType):
    """An ISO 8601 time; one without a zone is UTC."""

    name = "ISO time"

    def convert(self, value, param, ctx) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            self.fail(f"{value!r} is not an ISO time such as 2026-12-01 or 2026-12-01T08:00Z", param, ctx)
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


ISO_TIME = IsoTime()
