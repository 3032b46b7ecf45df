"""Dynamic batching: identical results to unbatched, nothing lost, nobody gets another's rows."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import image_bytes, random_image_bytes, serve_registry

from inference.batching import MicroBatcher


def row_ids(images: np.ndarray) -> np.ndarray:
    """A stand-in model: each output row carries its image's identity, so mix-ups show."""
    return images.reshape(len(images), -1)[:, :2].astype(np.float64)


def tagged(request_id: int, count: int) -> np.ndarray:
    images = np.zeros((count, 2, 2, 1), np.int64)
    images[:, 0, 0, 0] = request_id
    images[:, 0, 1, 0] = np.arange(count)
    return images


pytestmark = pytest.mark.backend_independent(
    "the batched answers and the Prometheus counters; recording the predictions is test_predictions'"
)


def test_every_request_gets_exactly_its_own_rows():
    sizes = []
    batcher = MicroBatcher(row_ids, max_batch=16, max_wait_ms=5, on_batch=sizes.append)
    with ThreadPoolExecutor(32) as pool:
        futures = {i: pool.submit(batcher, tagged(i, 1 + i % 5)) for i in range(300)}
        for request_id, future in futures.items():
            rows = future.result(timeout=30)
            assert rows.shape == (1 + request_id % 5, 2)
            assert (rows[:, 0] == request_id).all() and rows[:, 1].tolist() == list(range(len(rows)))
    batcher.close()
    assert sum(sizes) == sum(1 + i % 5 for i in range(300))
    assert max(sizes) <= 16 and max(sizes) > 1  # requests were really combined


def test_a_failure_reaches_every_waiting_request():
    def broken(images):
        raise ValueError("model failed")

    batcher = MicroBatcher(broken, max_batch=8, max_wait_ms=20)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(batcher, tagged(i, 1)) for i in range(4)]
        for future in futures:
            with pytest.raises(ValueError, match="model failed"):
                future.result(timeout=10)
    batcher.close()


def test_full_batches_skip_the_queue_and_closed_batchers_answer_directly():
    calls = []
    batcher = MicroBatcher(lambda images: calls.append(len(images)) or row_ids(images), max_batch=4, max_wait_ms=1000)
    started = time.perf_counter()
    assert batcher(tagged(1, 4)).shape == (4, 2)
    assert time.perf_counter() - started < 0.5
    batcher.close()
    assert batcher(tagged(2, 1))[0, 0] == 2
    assert calls == [4, 1]


@pytest.fixture
def batching_app(app, make_app):
    """A second app on the same database as `app`, with dynamic batching on."""
    batching = make_app(instance="batching", BATCHING_ENABLED=True, BATCH_MAX_WAIT_MS=20)
    serve_registry(batching)
    return batching


def test_batched_api_answers_equal_unbatched(app, batching_app):
    contents = [random_image_bytes(seed) for seed in range(12)] + [image_bytes()]
    plain = app.test_client()
    expected = [
        plain.post("/api/v1/predict", data=c, content_type="image/png").get_json()["predictions"][0]["probabilities"]
        for c in contents
    ]
    barrier = threading.Barrier(len(contents))

    def ask(content):
        barrier.wait()
        response = batching_app.test_client().post("/api/v1/predict", data=content, content_type="image/png")
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.get_json()["predictions"][0]["probabilities"]

    with ThreadPoolExecutor(len(contents)) as pool:
        answers = list(pool.map(ask, contents))
    for got, want in zip(answers, expected, strict=True):
        assert got.keys() == want.keys()
        np.testing.assert_allclose(list(got.values()), list(want.values()), atol=1e-5)
    metrics = batching_app.test_client().get("/metrics").get_data(as_text=True)
    assert "imgcls_model_batch_size_bucket" in metrics


def test_metrics_endpoint_counts_requests(client):
    client.post("/api/v1/predict", data=image_bytes(), content_type="image/jpeg")
    client.post("/api/v1/predict", data=b"junk", content_type="image/jpeg")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'imgcls_http_requests_total{method="POST",route="/api/v1/predict",status="200"}' in text
    assert 'status="415"' in text
    assert "imgcls_http_request_duration_seconds_bucket" in text
    assert 'imgcls_model_loaded{model_id="1",name="seed",slot="champion",version="1"} 1.0' in text
