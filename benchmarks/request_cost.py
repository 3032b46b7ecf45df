"""What one small-image API request costs beside the model, in this process (issue 21, part 4).

A real app on a throwaway instance with `--model` imported (the lean engine serving it) answers
`--requests` small JPEGs through POST /api/v1/predict (Flask's test client: no socket), and each
part of the request is timed on its own, same run, p50 in ms:

  request     the whole request through Flask (auth, parsing, decoding, scoring, history, JSON)
  decode      the upload to model input, with and without the 128-pixel history thumbnail
  model_call  the engine's call on the image's test-time views
  scoring     views, model call, calibration and OOD arithmetic (LoadedModel.score)
  history     recording the prediction (prediction_history.record: one INSERT and commit)

then a cProfile of the same requests, the functions with the most time of their own.

    PYTHONPATH=. python benchmarks/request_cost.py [--model models/default/model.h5] [--requests 300]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from serve import jpeg_bytes  # noqa: E402

from devtools.devserver import prepare_instance  # noqa: E402
from devtools.machine import cpu_model  # noqa: E402
from devtools.measure import p50_ms  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models/default/model.h5")
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    prepare_instance(args.model.resolve())

    import prediction_history
    import serving
    from app import create_app
    from predictor import scale_pixels, tta_views
    from web.extensions import model_serving

    app = create_app({"RATELIMIT_ENABLED": False})
    model_serving.refresh(app)
    client = app.test_client()
    body = jpeg_bytes((32, 32))

    def api_request():
        response = client.post("/api/v1/predict", data=body, content_type="image/jpeg")
        assert response.status_code == 200, response.data[:300]

    with app.app_context():
        loaded = model_serving.slot()
        budget = model_serving.budget
        upload = serving.Upload("small.jpg", body)
        size = loaded.input_size
        decoded = serving.decode_uploads([upload], [size], budget, 128)
        images, _ = serving.answer(decoded, loaded)
        spec = loaded.predictor.spec
        views, _ = tta_views(scale_pixels(loaded.batch(decoded), spec.input_scale), spec.tta)
        figures = {
            "request": p50_ms(api_request, args.requests),
            "decode_with_thumbnail": p50_ms(lambda: serving.decode_uploads([upload], [size], budget, 128), 300),
            "decode": p50_ms(lambda: serving.decode_uploads([upload], [size], budget), 300),
            "model_call": p50_ms(lambda: loaded.predictor._forward(views), 300),
            "scoring": p50_ms(lambda: loaded.score(decoded), 300),
            "history": p50_ms(lambda: prediction_history.record(images, loaded, "api", True), 300),
        }
    print(f"{cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    for name, value in figures.items():
        print(f"{name:<22} {value:>8.3f} ms")
    print(f"request / model call: {figures['request'] / figures['model_call']:.2f}x")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.requests):
        api_request()
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(25)
    print(out.getvalue())
    return int(not np.isfinite(list(figures.values())).all())


if __name__ == "__main__":
    sys.exit(main())
