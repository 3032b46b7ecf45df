"""End to end in a real browser: Playwright drives the system's Chromium against the real server.

One server and one browser serve the whole module (starting gunicorn with its model cost about
10 s a test); each test opens its own browser contexts, so its own cookies, and holds whatever
rows and calibration the module's other tests leave. Skipped, with the reason shown, where
Chromium or Playwright is missing (CI installs both). Screenshots land in the folder named by
SCREENSHOT_DIR (default: the test's temporary folder).
"""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import FORCED, force_calibration, gunicorn_user_env, image_bytes, make_user, random_image_bytes
from sqlalchemy import func, select

import model_store
from database import db
from devtools.devserver import CHROMIUM, CHROMIUM_FLAGS
from prediction_history import HistoryEntry
from web.pages import HISTORY_PAGE_SIZE

ROOT = Path(__file__).resolve().parent.parent
playwright = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
pytestmark = [
    pytest.mark.slow,  # gunicorn and a browser
    pytest.mark.backend_independent(
        "the pages' markup and script in a browser: the queries behind them run on PostgreSQL in "
        "test_predictions, test_accounts, test_decisions and test_explain, gunicorn on it in test_postgres"
    ),
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason="no Chromium at /usr/bin/chromium (apt-get install chromium)"
    ),
]


@pytest.fixture(scope="module")
def live_server(module_app, tmp_path_factory):
    """The app under gunicorn on a free port, sharing the module's database and instance folder."""
    app = module_app
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "INSTANCE_PATH": app.instance_path,
        "DATABASE_URL": app.config["SQLALCHEMY_DATABASE_URI"],
        "PORT": str(port),
        "WEB_WORKERS": "1",
        **gunicorn_user_env(),
    }
    log = tmp_path_factory.mktemp("gunicorn") / "gunicorn.log"
    with log.open("wb") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(server, url, log)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:  # a worker still importing TensorFlow ignores the graceful stop
            server.kill()
            server.wait(30)


@pytest.fixture(scope="module")
def browser():
    """One Chromium for the module; tests open their own contexts (cookies) in it."""
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def wait_until_healthy(server: subprocess.Popen, url: str, log: Path, timeout: float = 180.0) -> None:
    """Return once /healthz answers 200; fail with the server's log if it exits or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:  # not listening yet, or 503 while the model loads
            pass
        time.sleep(0.2)
    state = f"exited with {server.returncode}" if server.poll() is not None else f"not healthy after {timeout:.0f} s"
    pytest.fail(f"the server never answered 200 on /healthz ({state}); its log:\n{log.read_text()[-4000:]}")


def test_upload_see_ten_bars_correct_it_and_find_it_in_history(module_app, live_server, browser, tmp_path):
    shots = Path(os.environ.get("SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    photo = tmp_path / "ship.jpg"
    photo.write_bytes(image_bytes(size=(64, 64), color=(40, 90, 160)))
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.goto(live_server + "/")
    page.set_input_files("#image-input", str(photo))
    assert page.locator("#preview img").count() == 1  # the script showed a preview
    page.click("button[type=submit]")
    page.wait_for_selector(".result")
    predicted = page.locator(".top-class").inner_text()
    with module_app.app_context():
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
    page.context.close()


def test_the_three_decisions_read_in_words_and_unknown_hides_the_bars(module_app, live_server, browser, tmp_path):
    shots = Path(os.environ.get("SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    photo = tmp_path / "thing.png"
    photo.write_bytes(image_bytes("PNG", size=(48, 48), color=(90, 140, 60)))
    # Confident last: the module's server keeps the last calibration, under which every answer
    # reads as an uncalibrated model's do (confident, bars and map shown) for the other tests.
    expected = {
        "unsure": "Not sure: maybe",
        "unknown": "This does not look like any of: airplane, automobile",
        "confident": "✓ confident",
    }
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    for decision, words in expected.items():
        force_calibration(module_app, **FORCED[decision])
        time.sleep(1.5)  # the server looks for a new calibration once a second
        page.goto(live_server + "/")
        page.set_input_files("#image-input", str(photo))
        page.click("button[type=submit]")
        page.wait_for_selector(".result")
        result = page.locator(".result")
        assert result.get_attribute("data-decision") == decision
        assert words in result.inner_text()
        bars = page.locator(".result .bar-row").first
        # Unknown: the probabilities are there only on request, behind a <details>.
        assert bars.is_visible() == (decision != "unknown")
        if decision == "unknown":
            page.click(".result details summary")
            assert bars.is_visible()
        page.screenshot(path=str(shots / f"decision-{decision}.png"), full_page=True)
    page.context.close()


def test_where_it_looked_and_for_another_class(live_server, browser, tmp_path):
    shots = Path(os.environ.get("SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    photo = tmp_path / "wide.png"
    photo.write_bytes(random_image_bytes(0, size=(96, 64)))
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.goto(live_server + "/")
    page.set_input_files("#image-input", str(photo))
    page.click("button[type=submit]")
    page.wait_for_selector(".result .saliency-map")
    top = page.locator(".top-class").inner_text()
    assert page.locator(".saliency-class").inner_text() == top
    assert page.eval_on_selector(".saliency-map", "img => img.complete && img.naturalWidth") == 96
    page.screenshot(path=str(shots / "saliency.png"), full_page=True)

    other = "frog" if top != "frog" else "cat"
    page.select_option(".explain-class select", other)
    page.click(".explain-class button")
    page.wait_for_selector(".explain .saliency-map")
    assert page.locator(".saliency-class").inner_text() == other
    assert page.eval_on_selector(".saliency-map", "img => img.complete && img.naturalWidth") > 0
    page.screenshot(path=str(shots / "saliency-other-class.png"), full_page=True)
    page.context.close()


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


def test_operator_sees_everyones_predictions_a_member_only_their_own(module_app, live_server, browser, tmp_path):
    runner = module_app.test_cli_runner()
    make_user(runner, "olga", "operator")
    make_user(runner, "max")
    photo = tmp_path / "max_holiday.jpg"
    photo.write_bytes(image_bytes(size=(64, 64), color=(30, 160, 60)))
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
    # Everyone's: this test's two and those the module's other tests recorded (one page of them).
    with module_app.app_context():
        recorded = db.session.scalar(select(func.count()).select_from(HistoryEntry))
    assert 2 <= recorded <= HISTORY_PAGE_SIZE
    assert operator.locator(".history-row").count() == recorded
    # Newest first: the member's, then the anonymous visitor's, which the member cannot fetch.
    members, anonymous_one = (img.get_attribute("src") for img in operator.locator(".history-row img").all()[:2])
    assert operator.request.get(live_server + anonymous_one).status == 200
    assert member.request.get(live_server + members).status == 200
    assert member.request.get(live_server + anonymous_one).status == 404
    anonymous.goto(live_server + "/history")
    assert anonymous.locator(".history-row").count() == 1
    for page in (anonymous, member, operator):
        page.context.close()
