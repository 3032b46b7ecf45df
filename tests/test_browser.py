"""End to end in a real browser: Playwright drives the system's Chromium against the real server.

Skipped, with the reason shown, where Chromium or Playwright is missing (CI installs both).
Screenshots land in the folder named by SCREENSHOT_DIR (default: the test's temporary folder).
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import image_bytes, make_user

import model_store

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="no Chromium at /usr/bin/chromium (apt-get install chromium)"
)
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture
def live_server(app, tmp_path):
    """The app under gunicorn on a free port, sharing the test's database and instance folder."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "INSTANCE_PATH": app.instance_path,
        "DATABASE_URL": app.config["SQLALCHEMY_DATABASE_URI"],
        "PORT": str(port),
        "WEB_WORKERS": "1",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.2)
    yield url
    server.terminate()
    server.wait(30)


def test_upload_see_ten_bars_correct_it_and_find_it_in_history(app, live_server, tmp_path):
    shots = Path(os.environ.get("SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    photo = tmp_path / "ship.jpg"
    photo.write_bytes(image_bytes(size=(64, 64), color=(40, 90, 160)))
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(live_server + "/")
        page.set_input_files("#image-input", str(photo))
        assert page.locator("#preview img").count() == 1  # the script showed a preview
        page.click("button[type=submit]")
        page.wait_for_selector(".result")
        predicted = page.locator(".top-class").inner_text()
        with app.app_context():
            assert predicted in model_store.get_active().class_names
        assert page.locator(".result .bar-row").count() == 10
        page.screenshot(path=str(shots / "result.png"), full_page=True)

        correct = "cat" if predicted != "cat" else "dog"
        page.select_option(".feedback select", correct)
        page.click(".feedback button[value=wrong]")
        page.wait_for_selector(".flash")
        assert re.search(rf"marked wrong \(it is {correct}\)", page.locator(".flash").inner_text())
        row = page.locator(".history-row").first
        assert "ship.jpg" in row.inner_text() and f"marked wrong: it is {correct}" in row.inner_text()
        page.screenshot(path=str(shots / "history.png"), full_page=True)
        browser.close()


def _log_in(browser, url: str, name: str):
    """A fresh browser context (its own cookies) logged in through the /login form."""
    page = browser.new_context().new_page()
    page.goto(url + "/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", "correct horse")
    page.click("form.login button[type=submit]")
    page.wait_for_selector(".flash")
    assert f"Logged in as {name}" in page.locator(".flash").inner_text()
    return page


def test_operator_sees_everyones_predictions_a_member_only_their_own(app, live_server, tmp_path):
    runner = app.test_cli_runner()
    make_user(runner, "olga", "operator")
    make_user(runner, "max")
    photo = tmp_path / "max_holiday.jpg"
    photo.write_bytes(image_bytes(size=(64, 64), color=(30, 160, 60)))
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        anonymous = browser.new_context().new_page()
        anonymous.goto(live_server + "/")
        anonymous.set_input_files("#image-input", str(photo))
        anonymous.click("button[type=submit]")
        anonymous.wait_for_selector(".result")

        member = _log_in(browser, live_server, "max")
        member.set_input_files("#image-input", str(photo))
        member.click("#upload-form button[type=submit]")
        member.wait_for_selector(".result")
        assert "deleted after 30 days" in member.locator(".retention").inner_text()
        member.goto(live_server + "/history")
        assert member.locator("h1").inner_text() == "Your predictions"
        assert member.locator(".history-row").count() == 1

        operator = _log_in(browser, live_server, "olga")
        operator.goto(live_server + "/history")
        assert operator.locator("h1").inner_text() == "All predictions"
        assert operator.locator(".history-row").count() == 2
        # Newest first: the member's, then the anonymous visitor's, which the member cannot fetch.
        members, anonymous_one = (img.get_attribute("src") for img in operator.locator(".history-row img").all())
        assert operator.request.get(live_server + anonymous_one).status == 200
        assert member.request.get(live_server + members).status == 200
        assert member.request.get(live_server + anonymous_one).status == 404
        anonymous.goto(live_server + "/history")
        assert anonymous.locator(".history-row").count() == 1
        browser.close()
