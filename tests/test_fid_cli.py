"""The FID command line: help, clear errors, and both commands end to end with a stand-in feature map.

The real Inception network is tested in test_fid.py; compiling it here would take minutes, so the
end-to-end test swaps ``fid.inception_features`` for a cheap deterministic feature map.
"""

import json
import pathlib

import numpy as np
import pytest

from tarflow_jax import fid, input_pipeline
from tarflow_jax.tools import fid as fid_cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(capsys, *args):
    code = fid_cli.main(["tarflow_jax.tools.fid", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for flag in ("--samples", "--ref_stats", "--inception_weights", "--compute_ref_stats", "--config", "--out"):
        assert flag in out


def test_missing_weights_error_comes_first(tmp_path, capsys):
    code, _, err = run(capsys, f"--samples={tmp_path / 'none.npz'}", f"--ref_stats={tmp_path / 'none.npz'}")
    assert code == 1 and "--inception_weights is required" in err and fid.FID_WEIGHTS_URL in err
    code, _, err = run(capsys, f"--samples={tmp_path / 'none.npz'}", f"--ref_stats={tmp_path / 'none.npz'}",
                       f"--inception_weights={tmp_path}")
    assert code == 1 and f"FID Inception weights not found at '{tmp_path / fid.FID_WEIGHTS_FILE}'" in err
    (tmp_path / fid.FID_WEIGHTS_FILE).write_bytes(b"")
    code, _, err = run(capsys, f"--samples={tmp_path / 'none.npz'}", "--ref_stats=r.npz",
                       f"--inception_weights={tmp_path}")
    assert code == 1 and "--samples: no file at" in err
    code, _, err = run(capsys, "--compute_ref_stats", f"--inception_weights={tmp_path}", f"--out={tmp_path / 'r.npz'}")
    assert code == 1 and "needs --config" in err


def fake_features(variables, images, batch_size=50):
    """Four features per image: the means of its quadrants (over channels), as float64-friendly float32."""
    x = np.asarray(images, np.float32) / 255.0
    h, w = x.shape[1] // 2, x.shape[2] // 2
    quads = [x[:, :h, :w], x[:, :h, w:], x[:, h:, :w], x[:, h:, w:]]
    return np.stack([q.mean(axis=(1, 2, 3)) for q in quads], axis=1)


def test_ref_stats_and_fid_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(fid, "inception_features", fake_features)
    monkeypatch.setattr(fid, "load_inception_params", lambda path: {})
    monkeypatch.setattr(fid_cli, "CHUNK", 128)  # chunks of 100 (batch 50): several, and a ragged last one
    weights = tmp_path / fid.FID_WEIGHTS_FILE
    weights.write_bytes(b"")
    ref = tmp_path / "ref.npz"
    code, out, err = run(capsys, "--compute_ref_stats", "--config=configs/digits.py", f"--out={ref}",
                         f"--inception_weights={weights}")
    assert code == 0, err
    assert "1500 digits train images (8x8)" in out

    def rgb(split):  # digits levels 0..16 -> 0..255, grey -> RGB
        source = input_pipeline.DigitsSource(split)
        images = np.stack([source[i]["image"] for i in range(len(source))])
        return np.repeat(np.round(images * (255 / 16)).astype(np.uint8), 3, axis=-1)

    train_features = fake_features(None, rgb("train")).astype(np.float64)
    mu_ref, sigma_ref = fid.load_statistics(ref)
    np.testing.assert_allclose(mu_ref, train_features.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sigma_ref, np.cov(train_features, rowvar=False), rtol=1e-7, atol=1e-12)

    # Samples as main --mode=sample writes them: uint8 'arr_0' (here the test split, grey).
    test_images = rgb("test")[..., :1]
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=test_images, images=test_images, labels=np.zeros(len(test_images), np.int32))
    results = tmp_path / "fid.json"
    code, out, err = run(capsys, f"--samples={samples}", f"--ref_stats={ref}", f"--inception_weights={tmp_path}",
                         f"--sample_stats_out={tmp_path / 'sample_stats.npz'}", f"--results_json={results}")
    assert code == 0, err
    test_features = fake_features(None, np.repeat(test_images, 3, -1)).astype(np.float64)
    want = fid.frechet_distance(*fid.compute_statistics(test_features), mu_ref, sigma_ref)
    record = json.loads(results.read_text())
    assert record["num_samples"] == 297 and record["fid"] == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert f"FID {want:.4f}" in out
    # The saved sample statistics stand in for the samples.
    code, out, err = run(capsys, f"--samples={tmp_path / 'sample_stats.npz'}", f"--ref_stats={ref}",
                         f"--inception_weights={weights}")
    assert code == 0, err
    assert f"FID {want:.4f} (precomputed" in out
    # A random subset of the reference split.
    code, out, err = run(capsys, "--compute_ref_stats", "--config=configs/digits.py", "--split=test",
                         "--max_examples=100", f"--out={tmp_path / 'sub.npz'}", f"--inception_weights={weights}")
    assert code == 0 and "100 digits test images" in out, err


def test_bad_samples_file(tmp_path, capsys):
    weights = tmp_path / fid.FID_WEIGHTS_FILE
    weights.write_bytes(b"")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    fid.save_statistics(tmp_path / "ref.npz", np.zeros(4), np.eye(4))
    code, _, err = run(capsys, f"--samples={tmp_path / 'other.npz'}", f"--ref_stats={tmp_path / 'ref.npz'}",
                       f"--inception_weights={weights}")
    assert code == 1 and "neither images ('arr_0' or 'images') nor statistics" in err


def test_running_statistics_and_chunked_npz(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(53, 6)) @ rng.normal(size=(6, 6)) + 3.0
    stats = fid_cli.RunningStatistics()
    for start in range(0, 53, 10):
        stats.add(features[start:start + 10])
    mu, sigma = stats.result()
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-12)
    images = rng.integers(0, 256, (23, 4, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", arr_0=images)
    chunks = list(fid_cli.iter_npz_images(str(tmp_path / "a.npz"), "arr_0", chunk=10))
    assert [len(c) for c in chunks] == [10, 10, 3]
    np.testing.assert_array_equal(np.concatenate(chunks), images)
    assert sum(map(len, fid_cli.iter_npz_images(str(tmp_path / "a.npz"), "arr_0", chunk=10, limit=12))) == 12
