"""The per-pixel histogram baselines: the figures, recomputed independently, and the command line."""

import json
import math
import pathlib

import numpy as np
import pytest

from tarflow_jax import input_pipeline
from tarflow_jax.tools import baselines

ROOT = pathlib.Path(__file__).resolve().parents[1]


def digits_config():
    import importlib.util
    spec = importlib.util.spec_from_file_location("digits", ROOT / "configs" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def digits_result():
    return baselines.evaluate(digits_config())


def test_matches_a_direct_computation_on_digits(digits_result):
    train, test = input_pipeline.DigitsSource("train"), input_pipeline.DigitsSource("test")
    x = np.stack([train[i]["image"].ravel() for i in range(len(train))]).astype(int)
    y = np.array([train[i]["label"] for i in range(len(train))])
    xt = np.stack([test[i]["image"].ravel() for i in range(len(test))]).astype(int)
    yt = np.array([test[i]["label"] for i in range(len(test))])
    q, d = 17, 64

    def fit(images):
        return np.stack([(np.bincount(images[:, i], minlength=q) + 1) / (len(images) + q) for i in range(d)])

    def bits(p, images):
        return -np.log2(p[np.arange(d), images]).sum(axis=1) / d

    plain = bits(fit(x), xt)
    per_class = {c: fit(x[y == c]) for c in range(10)}
    given = np.array([bits(per_class[c], xt[i:i + 1])[0] for i, c in enumerate(yt)])
    prior = (np.bincount(y, minlength=10) + 1) / (len(y) + 10)
    mixture = np.array([-math.log2(sum(prior[c] * 2.0 ** (-d * bits(per_class[c], xt[i:i + 1])[0])
                                       for c in range(10))) / d for i in range(len(xt))])
    got = digits_result["baselines"]
    for name, want in (("pixels", plain), ("pixels given class", given), ("class mixture", mixture)):
        assert got[name]["bpd"] == pytest.approx(want.mean(), abs=1e-9), name
        assert got[name]["bpd_se"] == pytest.approx(want.std(ddof=1) / math.sqrt(len(want)), abs=1e-9)
    assert digits_result["num_fit"] == 1500 and digits_result["num_eval"] == 297
    # Knowing the class helps; the mixture lies between.
    assert got["pixels given class"]["bpd"] < got["class mixture"]["bpd"] < got["pixels"]["bpd"]


def test_command_line_prints_the_table_and_writes_json(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "b.json"
    assert baselines.main(["baselines", "--config=configs/digits.py", f"--out={out}"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert f"| pixels | {result['baselines']['pixels']['bpd']:.4f} ±" in printed
    assert baselines.main(["baselines"]) == 2
    assert "--config" in capsys.readouterr().err
