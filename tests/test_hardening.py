"""Hostile uploads, bad model files, integrity and concurrency: never a 500, nothing lost."""

import io
import itertools
import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import (
    build_seed_like_model,
    classify,
    image_bytes,
    login,
    make_user,
    png_claiming,
    random_image_bytes,
    serve_registry,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from sqlalchemy import select, text, update

import engine_store
import model_store
import prediction_history
from database import db
from devtools.hostile_files import truncated
from model_store import ModelCalibration, ModelStoreError, ModelVersion
from predictor import softmax
from registry.model_spec import CIFAR10_CLASSES
from web.extensions import model_serving

# Tests of decoding and refusing uploads: a refused one is refused before any query, and an
# accepted one is recorded as every prediction is (test_predictions checks that on PostgreSQL).
DECODING_ONLY = pytest.mark.backend_independent("decoding and refusing uploads; recording is test_predictions'")


def animated_gif() -> bytes:
    """Three frames of different random pixels, so that each frame gets its own answer."""
    frames = [Image.open(io.BytesIO(random_image_bytes(seed))) for seed in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def gif_frame_as_png(gif: bytes, index: int) -> bytes:
    """One frame of a GIF, as Pillow decodes it, in a lossless single-image file."""
    image = Image.open(io.BytesIO(gif))
    image.seek(index)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


HOSTILE_FILES = {
    "empty": ("empty.jpg", b"", 400),
    "random-bytes": ("random.bin", bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)), 415),
    "text-named-jpg": ("notes.jpg", b"Dear diary, this is not a picture.\n" * 20, 415),
    "truncated-jpeg": ("half.jpg", truncated("JPEG"), 400),
    "truncated-png": ("half.png", truncated("PNG"), 400),
    "svg": ("x.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', 415),
    "pdf": ("x.pdf", b"%PDF-1.7\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF", 415),
    "html": ("x.html", b"<!doctype html><script>alert(1)</script>", 415),
    "png-50000x50000": ("bomb.png", png_claiming(50_000, 50_000), 413),
}


@pytest.mark.parametrize("case", HOSTILE_FILES, ids=list(HOSTILE_FILES))
@pytest.mark.parametrize("route", ["/", "/api/v1/predict"])
@DECODING_ONLY
def test_hostile_files_get_a_clear_4xx_and_the_next_request_works(client, case, route):
    name, data, status = HOSTILE_FILES[case]
    response = client.post(route, data={"image": [(io.BytesIO(data), name)]}, content_type="multipart/form-data")
    assert response.status_code == status
    body = response.get_data(as_text=True)
    assert "Traceback" not in body and name in body  # the message names the file at fault
    follow_up = client.post("/api/v1/predict", data=image_bytes(), content_type="image/jpeg")
    assert follow_up.status_code == 200


def peak_rss_kb() -> int:
    """This process's peak resident memory since the last `reset_peak_rss` (Linux's VmHWM), in KB."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


def reset_peak_rss() -> int:
    """Lower the peak to the current resident memory and return it, in KB.

    ru_maxrss is the peak over the process's whole life, so an earlier test's peak (loading
    TensorFlow, say) would hide this test's; writing 5 to clear_refs starts a new peak.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as exc:
        pytest.skip(f"cannot reset the peak resident memory here: {exc}")
    return peak_rss_kb()


@DECODING_ONLY
def test_bomb_is_refused_before_any_large_allocation(client):
    assert client.post("/api/v1/predict", data=image_bytes(), content_type="image/jpeg").status_code == 200
    baseline = reset_peak_rss()  # the model is loaded and warm: what follows is the bomb's alone
    response = client.post("/api/v1/predict", data=png_claiming(50_000, 50_000), content_type="image/png")
    growth = peak_rss_kb() - baseline
    assert response.status_code == 413 and "too many pixels" in response.get_json()["error"]["message"]
    assert growth < 100_000, f"peak memory rose by {growth / 1024:.0f} MB"  # decoding it would take 7.5 GB


@DECODING_ONLY
def test_animated_gif_uses_its_first_frame(client):
    def probabilities(data: bytes, content_type: str) -> list[float]:
        response = client.post("/api/v1/predict", data=data, content_type=content_type)
        assert response.status_code == 200, response.get_data(as_text=True)
        answer = response.get_json()["predictions"][0]["probabilities"]
        return [answer[name] for name in CIFAR10_CLASSES]

    gif = animated_gif()
    first, second = (probabilities(gif_frame_as_png(gif, index), "image/png") for index in (0, 1))
    assert not np.allclose(first, second, atol=1e-4)  # the frames differ enough to tell apart
    np.testing.assert_allclose(probabilities(gif, "image/gif"), first, atol=1e-6)


def project_files(root: Path) -> set[Path]:
    """Every file and folder under the project but the virtual environment's 35,000 and Python's
    byte-code caches (listing those was most of a test's time)."""
    found = set()
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in {".venv", "__pycache__"}]
        found.update(Path(folder, name) for name in [*subfolders, *files])
    return found


@pytest.mark.parametrize(
    ("name", "shown"),
    [("../../etc/passwd.jpg", "passwd.jpg"), ("a\x00b.jpg", "ab.jpg"), ("x" * 300 + ".jpg", "x" * 100)],
    ids=["dot-dot", "nul", "300-chars"],
)
def test_strange_file_names_are_cleaned_and_nothing_is_written(app, client, name, shown):
    root = Path(app.root_path)
    before = project_files(root)
    response = client.post(
        "/api/v1/predict", data={"image": [(io.BytesIO(image_bytes()), name)]}, content_type="multipart/form-data"
    )
    assert response.status_code == 200
    assert response.get_json()["predictions"][0]["filename"] == shown
    after = project_files(root)
    new_files = [p for p in after - before if not p.is_relative_to(app.instance_path)]
    assert new_files == []


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"data": b""}, 400),  # zero-byte body, no content type
        ({"data": image_bytes()}, 415),  # an image without a content type
        ({"data": image_bytes(), "content_type": "application/octet-stream"}, 415),
        ({"data": {"other": (io.BytesIO(image_bytes()), "x.jpg")}, "content_type": "multipart/form-data"}, 400),
        ({"data": b"", "content_type": "image/jpeg"}, 400),
    ],
    ids=["zero-byte", "no-content-type", "octet-stream", "missing-field", "empty-image-body"],
)
@DECODING_ONLY
def test_wrong_or_missing_content_type_and_fields(client, kwargs, status):
    response = client.post("/api/v1/predict", **kwargs)
    assert response.status_code == status and response.get_json()["error"]["message"]


@DECODING_ONLY
def test_too_many_images_is_413(app, client):
    app.config["MAX_IMAGES_PER_REQUEST"] = 2
    files = [(io.BytesIO(image_bytes()), f"{i}.jpg") for i in range(3)]
    response = client.post("/api/v1/predict", data={"image": files}, content_type="multipart/form-data")
    assert response.status_code == 413 and "at most 2" in response.get_json()["error"]["message"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096))
@DECODING_ONLY
def test_arbitrary_bytes_never_cause_a_500(client, data):
    response = client.post("/api/v1/predict", data=data, content_type="image/jpeg")
    assert 200 <= response.status_code < 500
    if response.status_code != 200:
        assert response.get_json()["error"]["message"]


IMAGE_MODES = ["RGB", "L", "LA", "RGBA", "P", "CMYK", "I;16", "1"]
IMAGE_FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]
# The pairs Pillow refuses to write (nothing to upload); every other pair must be written and served.
UNWRITABLE = {
    ("LA", "JPEG"), ("RGBA", "JPEG"), ("P", "JPEG"), ("I;16", "JPEG"),
    ("LA", "BMP"), ("CMYK", "BMP"), ("I;16", "BMP"), ("CMYK", "PNG"), ("CMYK", "GIF"),
}  # fmt: skip


def random_image(mode: str, fmt: str, width: int, height: int, seed: int) -> bytes:
    """Random pixels in `mode`, encoded as `fmt` (raises where Pillow cannot write the pair)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").convert(mode).save(buffer, fmt)
    return buffer.getvalue()


def served_with_probabilities_summing_to_one(client, data: bytes, fmt: str) -> bool:
    response = client.post("/api/v1/predict", data=data, content_type="image/" + fmt.lower())
    if response.status_code != 200:
        return False
    probabilities = response.get_json()["predictions"][0]["probabilities"]
    return abs(sum(probabilities.values()) - 1) < 1e-4


@DECODING_ONLY
def test_every_mode_and_format_pillow_writes_is_served(client):
    """Each of the 48 pairs once: Pillow refuses exactly the unwritable ones, the app serves the rest."""
    refused, not_served = set(), set()
    for mode, fmt in itertools.product(IMAGE_MODES, IMAGE_FORMATS):
        try:
            data = random_image(mode, fmt, 37, 23, seed=0)
        except (OSError, ValueError, KeyError):
            refused.add((mode, fmt))
            continue
        if not served_with_probabilities_summing_to_one(client, data, fmt):
            not_served.add((mode, fmt))
    assert refused == UNWRITABLE and not_served == set()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    width=st.integers(1, 300),
    height=st.integers(1, 300),
    mode=st.sampled_from(IMAGE_MODES),
    fmt=st.sampled_from(IMAGE_FORMATS),
    seed=st.integers(0, 2**16),
)
@DECODING_ONLY
def test_any_valid_image_gets_probabilities_summing_to_one(client, width, height, mode, fmt, seed):
    # A rejected pair is replaced by a new example, so all 30 examples are uploads.
    assume((mode, fmt) not in UNWRITABLE)
    assert served_with_probabilities_summing_to_one(client, random_image(mode, fmt, width, height, seed), fmt)


def test_secret_key_is_generated_in_the_instance_folder(make_app):
    first = make_app(instance="inst", SECRET_KEY=None)
    key_file = Path(first.instance_path) / "secret_key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert first.secret_key == key_file.read_text().strip() and len(first.secret_key) == 64
    assert make_app(instance="inst", SECRET_KEY=None).secret_key == first.secret_key


def registry_state(app) -> tuple[list, list]:
    """Every stored model (what it is, whether it is active) and every calibration."""
    with app.app_context():
        db.session.expire_all()
        models = [(r.id, r.name, r.version, r.sha256, r.is_active, r.metrics) for r in model_store.list_models()]
        calibrations = db.session.execute(select(ModelCalibration.model_id, ModelCalibration.created_at)).all()
        return models, calibrations


def test_no_web_route_changes_the_registry(app, client, runner, other_model_file):
    # Models are imported, activated, calibrated and deleted with the CLI only. An operator sends
    # every route that takes a write method a request naming each model, in its path (every
    # argument) and its form, with a model file attached: the registry must be as it was.
    with app.app_context():
        ids = [row.id for row in model_store.list_models()]
        ids.append(model_store.import_model(other_model_file, name="other").id)
    make_user(runner, "root", role="operator")
    assert login(client, "root").status_code == 302
    assert classify(client, image_bytes()).status_code == 200  # a prediction, for the routes that take one
    before = registry_state(app)
    adapter = app.url_map.bind("localhost")
    sent = set()
    for rule, model_id in itertools.product(app.url_map.iter_rules(), ids):
        for method in sorted(rule.methods & {"POST", "PUT", "PATCH", "DELETE"}):
            login(client, "root")  # again: one of the routes is /logout
            path = adapter.build(rule.endpoint, dict.fromkeys(rule.arguments, model_id), method=method)
            form = {"model_id": model_id, "id": model_id, "name": "other", "activate": "1", "confirm": "1"}
            form |= {field: (io.BytesIO(other_model_file.read_bytes()), "other.h5") for field in ("file", "model")}
            assert client.open(path, method=method, data=form).status_code < 500, (method, path)
            sent.add(path)
    assert {"/api/v1/predict", "/logout", f"/predictions/{ids[-1]}/feedback"} <= sent  # the loop did reach routes
    assert registry_state(app) == before


def test_model_with_an_unknown_custom_class_is_refused(app, seed_model_file, tmp_path):
    path = tmp_path / "custom.h5"
    path.write_bytes(seed_model_file.read_bytes())
    with h5py.File(path, "r+") as handle:
        config = handle.attrs["model_config"]
        config = config.decode() if isinstance(config, bytes) else config
        handle.attrs["model_config"] = config.replace('"class_name": "Dense"', '"class_name": "Backdoor"')
    with app.app_context():
        before = [r.id for r in model_store.list_models()]
        with pytest.raises(ModelStoreError, match="safe Keras model"):
            model_store.import_model(path)
        assert [r.id for r in model_store.list_models()] == before


def _corrupt_and_activate(other_model_file) -> int:
    """Store a model, break its BLOB and its conversion's (what a worker serves) and make it active
    behind the registry's back."""
    other = model_store.import_model(other_model_file, name="broken")
    db.session.execute(update(ModelVersion).values(is_active=False))
    db.session.execute(update(ModelVersion).where(ModelVersion.id == other.id).values(is_active=True, blob=b"garbage"))
    db.session.execute(
        update(engine_store.EngineFile).where(engine_store.EngineFile.model_sha256 == other.sha256).values(blob=b"junk")
    )
    db.session.commit()
    return other.id


def test_corrupt_active_model_keeps_the_last_good_one_serving(app, client, other_model_file):
    assert client.get("/healthz").status_code == 200
    with app.app_context():
        broken_id = _corrupt_and_activate(other_model_file)
    serve_registry(app)
    response = client.post("/api/v1/predict", data=image_bytes(), content_type="image/jpeg")
    assert response.status_code == 200 and response.get_json()["model"]["name"] == "seed"
    health = client.get("/healthz")
    assert health.status_code == 503 and f"id {broken_id}" in health.get_json()["error"]
    assert "corrupt" in client.get("/").get_data(as_text=True)
    assert list(Path(app.config["MODEL_CACHE_DIR"]).glob("*.tmp*")) == []


def test_corrupt_active_model_at_start_up_is_reported_not_crashed(app, make_app, other_model_file):
    with app.app_context():
        _corrupt_and_activate(other_model_file)
    fresh = make_app(MODEL_CACHE_DIR=str(Path(app.instance_path) / "fresh-cache"))
    client = fresh.test_client()
    assert client.get("/healthz").status_code == 503  # nothing loaded yet
    serve_registry(fresh)
    assert client.get("/healthz").status_code == 503
    response = client.post("/api/v1/predict", data=image_bytes(), content_type="image/jpeg")
    assert response.status_code == 503 and "corrupt" in response.get_json()["error"]["message"]
    assert "corrupt" in client.get("/").get_data(as_text=True)


def test_concurrent_rehydration_is_atomic(app, tmp_path):
    with app.app_context():
        row = model_store.get_active()
        blob = row.blob
        with ThreadPoolExecutor(8) as pool:
            paths = list(pool.map(lambda _: model_store.rehydrate(row, tmp_path / "cache"), range(16)))
    assert len(set(paths)) == 1 and paths[0].read_bytes() == blob
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [paths[0].name]


def test_activation_during_requests_answers_with_one_whole_model(app, other_model_file, seed_model_file):
    import keras

    contents = [random_image_bytes(seed) for seed in range(4)]
    pixels = [np.asarray(Image.open(io.BytesIO(c)).convert("RGB"), np.float32)[None] / 255 for c in contents]
    expected = {}
    for name, path in (("seed", seed_model_file), ("other", other_model_file)):
        model = keras.saving.load_model(path, compile=False)
        expected[name] = [softmax(np.asarray(model(p)))[0] for p in pixels]
    with app.app_context():
        ids = {
            "seed": model_store.get_active().id,
            "other": model_store.import_model(other_model_file, name="other").id,
        }
    stop = threading.Event()

    def switch():  # what a worker's poller does between the requests
        with app.app_context():
            while not stop.is_set():
                for model_id in ids.values():
                    model_store.activate(model_id)
                    serve_registry(app)

    switcher = threading.Thread(target=switch)
    switcher.start()
    client = app.test_client()
    answered = Counter()
    try:
        # Until each model has answered a few times (both sides of a switch), not a fixed 40 rounds.
        for round_ in range(40):
            index = round_ % len(contents)
            response = client.post("/api/v1/predict", data=contents[index], content_type="image/png")
            assert response.status_code == 200
            body = response.get_json()
            name = body["model"]["name"]
            answered[name] += 1
            got = [body["predictions"][0]["probabilities"][c] for c in CIFAR10_CLASSES]
            np.testing.assert_allclose(got, expected[name][index], atol=1e-5)
            if len(answered) == 2 and min(answered.values()) >= 3:
                break
    finally:
        stop.set()
        switcher.join()
    assert set(answered) == {"seed", "other"}


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(app):
    with app.app_context():
        if db.engine.dialect.name != "sqlite":
            pytest.skip("WAL and busy_timeout are SQLite settings; this run uses PostgreSQL")
        assert db.session.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert db.session.execute(text("PRAGMA busy_timeout")).scalar() == 10000


def _nan_model_file(path: Path) -> Path:

    model = build_seed_like_model()
    model.layers[-1].kernel.assign(np.full(model.layers[-1].kernel.shape, np.nan, np.float32))
    model.save(path)
    return path


def test_a_model_with_non_finite_output_is_refused_at_import(app, tmp_path):
    with app.app_context():
        before = [r.id for r in model_store.list_models()]
        with pytest.raises(ModelStoreError, match="not finite"):
            model_store.import_model(_nan_model_file(tmp_path / "nan.h5"))
        assert [r.id for r in model_store.list_models()] == before


def test_non_finite_output_at_serving_is_a_clear_error_not_a_crash(app, client, tmp_path):
    import keras

    from predictor import ModelOutputError, ModelSpec, Predictor

    model = keras.saving.load_model(_nan_model_file(tmp_path / "nan.h5"), compile=False)
    with pytest.raises(ModelOutputError):
        Predictor(model, ModelSpec(tuple(CIFAR10_CLASSES), (32, 32, 3))).predict_arrays(
            np.zeros((1, 32, 32, 3), np.uint8)
        )
    with app.app_context():
        loaded = model_serving.slot()
    # The served engine starts answering NaN (a fault of the model, not of the upload).
    loaded.predictor._forward = lambda batch: [np.full((len(batch), len(CIFAR10_CLASSES)), np.nan, np.float32)]
    response = client.post("/api/v1/predict", data=image_bytes(), content_type="image/jpeg")
    assert response.status_code == 500 and response.get_json()["error"]["code"] == "model_output"
    with app.app_context():
        assert list(db.session.scalars(prediction_history.query())) == []  # nothing half-recorded


def test_a_failed_load_of_any_kind_keeps_the_last_good_model(app, client, other_model_file, monkeypatch):
    import serving

    assert client.get("/healthz").status_code == 200
    with app.app_context():
        model_store.import_model(other_model_file, name="next", activate=True)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(serving.model_store, "atomic_write", disk_full)  # writing the engine's file
    serve_registry(app)
    response = client.post("/api/v1/predict", data=image_bytes(), content_type="image/jpeg")
    assert response.status_code == 200 and response.get_json()["model"]["name"] == "seed"
    health = client.get("/healthz")
    assert health.status_code == 503 and "No space left" in health.get_json()["error"]


def test_deleting_a_model_keeps_its_history_unlinked(app, client, other_model_file):
    with app.app_context():
        other_id = model_store.import_model(other_model_file, name="other", activate=True).id
    serve_registry(app)
    assert client.post("/api/v1/predict", data=image_bytes(), content_type="image/jpeg").status_code == 200
    with app.app_context():
        seed_id = next(r.id for r in model_store.list_models() if r.name == "seed")
        model_store.activate(seed_id)
        model_store.delete(other_id)
        row = db.session.scalars(prediction_history.query()).first()
        assert (row.model_id, row.model_name) == (None, "other")


@DECODING_ONLY
def test_the_api_refuses_cross_site_browser_posts(client):
    def post(headers):
        return client.post("/api/v1/predict", data=image_bytes(), content_type="image/jpeg", headers=headers)

    refused = post({"Origin": "https://evil.example"})
    assert refused.status_code == 403 and refused.get_json()["error"]["code"] == "cross_site"
    assert post({"Origin": "http://localhost"}).status_code == 200  # the test client's own host
    assert post({"Origin": "http://localhost:80"}).status_code == 200  # the same origin, port spelled out
    assert post({}).status_code == 200  # scripts send no Origin
    # A trusted host is not enough: another port or scheme is another origin (another program).
    for other in ("http://127.0.0.1:9999", "http://localhost:9999", "https://localhost", "http://localhost:x"):
        assert post({"Origin": other}).status_code == 403, other


def test_over_https_the_session_cookie_is_secure_and_host_prefixed(make_app):
    app = make_app(PROXY_HOPS=2)  # a TLS terminator, then nginx
    with app.app_context():
        model_store.init_db()
    make_user(app.test_cli_runner(), "max")
    client = app.test_client()
    # What nginx forwards behind the terminator: the terminator's values, then its own.
    behind_tls = {"X-Forwarded-Proto": "https, http", "X-Forwarded-For": "203.0.113.5, 10.0.0.2"}
    cookie = login(client, "max", headers=behind_tls).headers["Set-Cookie"]
    assert cookie.startswith("__Host-session=") and "; Secure" in cookie and "Path=/" in cookie
    assert "Domain" not in cookie
    assert client.get("/history", headers=behind_tls).status_code == 200  # read back under its name

    plain = app.test_client()
    cookie = login(plain, "max").headers["Set-Cookie"]  # HTTP: the name and flags a browser takes there
    assert cookie.startswith("session=") and "Secure" not in cookie
    # With nginx alone (one hop), a client's own X-Forwarded-Proto does not make it HTTPS.
    one_hop = make_app(instance="one-hop", PROXY_HOPS=1).test_client()
    assert login(one_hop, "max", headers=behind_tls).headers["Set-Cookie"].startswith("session=")
