"""Make the README's screenshot: the shipped model classifying CIFAR-10 test images in Chromium.

    python docs/make_screenshot.py [--model models/default/model.h5] [--data ARCHIVE]

Starts the production server on a free port with a temporary instance folder, uploads a ship and
a cat from the test split through the page, and saves docs/screenshot.png.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import tempfile
from pathlib import Path

from devtools.devserver import CHROMIUM, CHROMIUM_FLAGS, Server, prepare_instance
from training.data import DEFAULT_ARCHIVE

ROOT = Path(__file__).resolve().parent.parent


def test_images(archive: Path, names: list[str], folder: Path) -> list[Path]:
    """Copy the named members of the data archive (e.g. test/ship/0000.jpg) into `folder`."""
    paths = []
    with tarfile.open(archive) as source:
        for name in names:
            path = folder / name.replace("/", "-")
            path.write_bytes(source.extractfile(name).read())
            paths.append(path)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models/default/model.h5")
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/screenshot.png")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    instance = prepare_instance(args.model, name="cifar10-default")
    server = Server(instance, workers=1, threads=2, batching=False)
    with tempfile.TemporaryDirectory() as scratch:
        images = test_images(args.data, ["test/ship/0000.jpg", "test/cat/0000.jpg"], Path(scratch))
        try:
            with sync_playwright() as driver:
                browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
                page = browser.new_page(viewport={"width": 1000, "height": 800})
                page.goto(f"http://127.0.0.1:{server.port}/")
                page.set_input_files("#image-input", [str(p) for p in images])
                page.click("button[type=submit]")
                page.wait_for_selector(".result")
                page.screenshot(path=str(args.out), full_page=True)
                print("top classes:", page.locator(".top-class").all_inner_texts())
                browser.close()
        finally:
            server.stop()
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
