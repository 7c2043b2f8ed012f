"""The exporter's own logging set-up (exporter/logs.py): one handler, quiet libraries."""

from __future__ import annotations

import logging

import pytest

from exporter import logs


@pytest.fixture
def restored_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    httpx_level = logging.getLogger("httpx").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(httpx_level)


def test_a_request_made_through_httpx_is_not_a_log_line(restored_logging, capsys):
    """The alert push makes a request a minute; httpx logs each at INFO, which was 76
    lines in 8 minutes of nothing but success. Its warnings still come through."""
    logs.setup("info")
    logging.getLogger("httpx").info('HTTP Request: POST http://am/api/v2/alerts "200 OK"')
    logging.getLogger("httpx").warning("something httpx warns of")
    logging.getLogger("exporter.alert_push").info("alert push recovered")
    err = capsys.readouterr().err
    assert "HTTP Request" not in err
    assert "something httpx warns of" in err and "alert push recovered" in err
