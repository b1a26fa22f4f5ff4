"""The live console's page and files: served with headers that keep it to itself, and shipped.

The page's behaviour (live stream, gaps, reconnects, the figures it shows) is tested in a real
Chromium against a real stack in ``tests/integration/test_console.py``.
"""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

import httpx

from qtrader.viewer import FanoutHub, create_viewer_app

ROOT = Path(__file__).resolve().parents[3]
CONSOLE = ROOT / "workloads" / "qtrader" / "viewer" / "console"


def _client() -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_viewer_app(FanoutHub()))
    return httpx.AsyncClient(transport=transport, base_url="http://console.test")


async def test_console_page_and_its_files_are_served_with_a_policy_of_this_origin_only() -> None:
    async with _client() as client:
        page = await client.get("/console")
        script = await client.get("/console/console.js")
        style = await client.get("/console/console.css")
        missing = await client.get("/console/secrets.txt")
    assert page.status_code == script.status_code == style.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert script.headers["content-type"].startswith("text/javascript")
    assert style.headers["content-type"].startswith("text/css")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'self'" in policy
    assert "connect-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert 'src="console/console.js"' in page.text
    assert missing.status_code == 404


def test_console_files_use_nothing_from_another_host() -> None:
    for path in CONSOLE.iterdir():
        text = path.read_text()
        assert "http://" not in text, path
        assert "https://" not in text, path
        assert "//cdn" not in text, path


def test_every_console_file_is_package_data_so_the_wheel_ships_it() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["qtrader"]
    files = [p.relative_to(ROOT / "workloads" / "qtrader").as_posix() for p in CONSOLE.iterdir()]
    assert sorted(files) == [
        "viewer/console/console.css",
        "viewer/console/console.js",
        "viewer/console/index.html",
    ]
    for name in files:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name
