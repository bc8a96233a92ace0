"""The web view: one page, one script, one style, for both the live view at
``/`` of ``serve`` and ``consume`` and the replay report.

The script renders every view (incidents and findings, an incident, a trace's
waterfall, a stage's series) from JSON. Live, it fetches the API and polls it
every ``ui.refresh``; in the report, the same script reads the data inlined
in the file, so the report shows the same views from the same code and needs
no network. Nothing is loaded from elsewhere (an air-gapped cluster sees the
same page).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from traceguard import __version__
from traceguard.config import UiConfig

_MEDIA_TYPES = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}


def _read(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def asset(name: str) -> tuple[str, str] | None:
    """The script or the style, with its media type; None for any other name."""
    media_type = _MEDIA_TYPES.get(name)
    return (_read(name), media_type) if media_type else None


def _settings(ui: UiConfig, **more: Any) -> dict[str, Any]:
    return {"version": __version__, "trace_link": ui.trace_link, "refresh_ms": ui.refresh // 1_000_000, **more}


def _inline(text: str) -> str:
    """Script text (code or JSON) that cannot end the <script> element it sits in:
    "<\\/" reads as "</" in a string, a regular expression or JSON."""
    return text.replace("</", "<\\/")


def _inline_json(value: Any) -> str:
    return _inline(json.dumps(value, separators=(",", ":")))


def live_page(ui: UiConfig) -> str:
    return _read("page.html").format(
        style='<link rel="stylesheet" href="ui/app.css">',
        settings=_inline_json(_settings(ui, mode="live")),
        script='<script src="ui/app.js"></script>',
    )


def report_page(data: dict[str, Any], ui: UiConfig) -> str:
    """One self-contained file: the style, the data and the script inlined."""
    return _read("page.html").format(
        style=f"<style>{_read('app.css')}</style>",
        settings=_inline_json(_settings(ui, mode="report", data=data)),
        script=f"<script>{_inline(_read('app.js'))}</script>",
    )
