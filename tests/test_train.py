"""train.py end to end on a tiny synthetic image-folder data set, and the evaluation maths."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import model_store
import train
from app import create_app
from predictor import ModelSpec

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}
ROOT = Path(__file__).resolve().parent.parent


def quick_args(folder: Path, out: Path, *extra: str) -> list[str]:
    """train.py arguments for one short epoch on the tiny data set."""
    return ["--data", str(folder), "--epochs", "1", "--batch-size", "8", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """train/<class>/ and test/<class>/ with noisy colour images of assorted sizes and formats."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 4)):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                size = (int(rng.integers(24, 64)), int(rng.integers(24, 64)))
                pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_train_end_to_end_writes_model_metrics_plots_and_imports(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("INSTANCE_PATH", str(tmp_path / "instance"))
    out = tmp_path / "run"
    assert train.main(quick_args(tiny_folder, out, "--import", "--name", "colours")) == 0
    written = json.loads((out / "metrics.json").read_text())
    assert written["class_names"] == ["blue", "green", "red"]
    assert written["train_images"] + written["val_images"] == 36 and written["test_images"] == 12
    assert written["epochs"] == 1 and written["tta"] == "flip" and len(written["history"]["loss"]) == 1
    assert 0 <= written["test_accuracy"] <= 1 and len(written["confusion_matrix"]) == 3
    assert written["data_sha256"] and written["inference"]["images_per_s_batch64"] > 0
    for name in ("model.h5", "report/report.json", "report/confusion.png", "report/curves.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "report/curves.png").read_bytes().startswith(b"\x89PNG")

    app = create_app()
    with app.app_context():
        row = model_store.get_active()
        assert (row.name, row.class_names, row.tta) == ("colours", ["blue", "green", "red"], "flip")
        assert row.metrics["arch"] == "strong" and row.metrics["test_accuracy"] == written["test_accuracy"]
    response = app.test_client().get(f"/models/{row.id}")
    assert response.status_code == 200 and "Training curves" in response.get_data(as_text=True)
    assert app.test_client().get(f"/models/{row.id}/curves.png").data.startswith(b"\x89PNG")


def test_seed_architecture_and_evaluate_command(tiny_folder, tmp_path, capsys):
    out = tmp_path / "seed"
    train.main(["--arch", "seed", "--data", str(tiny_folder), "--epochs", "1", "--out", str(out)])
    written = json.loads((out / "metrics.json").read_text())
    assert written["arch"] == "seed" and written["batch_size"] == 32 and written["precision"] == "float32"
    assert written["tta"] == "none"
    capsys.readouterr()
    train.main(["evaluate", str(out / "model.h5"), "--data", str(tiny_folder), "--out", str(tmp_path / "eval")])
    printed = capsys.readouterr().out
    assert "accuracy:" in printed and "confusion matrix" in printed
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["test"]["accuracy"] == pytest.approx(written["test_accuracy"])


def test_same_seed_gives_the_same_run(tiny_folder, tmp_path):
    runs = []
    for name in ("a", "b"):
        train.main(["--arch", "seed", "--data", str(tiny_folder), "--epochs", "2", "--out", str(tmp_path / name)])
        runs.append(json.loads((tmp_path / name / "metrics.json").read_text())["history"]["loss"])
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-3)


class KnownPredictor:
    """Answers a fixed class per image, so the evaluation figures are known in advance."""

    spec = ModelSpec(("a", "b", "c"), (2, 2, 3))

    def predict_arrays(self, images):
        return np.eye(3)[images[:, 0, 0, 0]]


def test_evaluation_figures_for_a_known_case():
    predicted = np.array([0, 0, 1, 1, 1, 2, 0, 2])
    truth = np.array([0, 0, 1, 1, 0, 2, 2, 2])
    images = np.zeros((8, 2, 2, 3), np.uint8)
    images[:, 0, 0, 0] = predicted
    result = train.evaluate_predictor(KnownPredictor(), images, truth)
    assert result["accuracy"] == pytest.approx(6 / 8)
    assert result["per_class_accuracy"] == pytest.approx({"a": 2 / 3, "b": 1.0, "c": 2 / 3})
    assert result["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 2]]


def test_stratified_split_keeps_every_class_and_is_seeded():
    labels = np.repeat(np.arange(4), 10)
    train_idx, val_idx = train.stratified_split(labels, 0.2, seed=1)
    assert len(val_idx) == 8 and np.bincount(labels[val_idx]).tolist() == [2, 2, 2, 2]
    assert set(train_idx).isdisjoint(val_idx) and len(train_idx) + len(val_idx) == 40
    assert np.array_equal(val_idx, train.stratified_split(labels, 0.2, seed=1)[1])


def test_mirrored_strategy_over_two_logical_cpus(tiny_folder, tmp_path):
    out = tmp_path / "mirrored"
    command = [sys.executable, "train.py", *quick_args(tiny_folder, out, "--distribute", "mirrored")]
    command += ["--logical-cpus", "2", "--verbose", "0"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 replica(s)" in result.stdout
    written = json.loads((out / "metrics.json").read_text())
    assert written["replicas"] == 2 and written["distribute"] == "mirrored"


def test_cutout_greys_out_at_most_one_square():
    import tensorflow as tf

    image = tf.ones((32, 32, 3))
    for _ in range(20):
        grey = (train.cut_out(image, 8).numpy() == 0.5).all(axis=2)
        rows, cols = np.nonzero(grey)
        assert 0 < grey.sum() <= 64 and np.ptp(rows) < 8 and np.ptp(cols) < 8


def test_cutout_and_ema_flags_train_and_are_recorded(tiny_folder, tmp_path):
    out = tmp_path / "regularised"
    assert train.main(quick_args(tiny_folder, out, "--cutout", "8", "--ema", "0.9")) == 0
    written = json.loads((out / "metrics.json").read_text())
    assert (written["cutout"], written["ema"]) == (8, 0.9) and (out / "model.h5").exists()
