"""FID: Fréchet distance, statistics files, the Flax FID Inception against pytorch-fid, end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tarflow_jax import fid

TORCH_REASON = "comparing with pytorch-fid needs torch, torchvision and pytorch-fid " \
               "(pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid==0.3.0)"


def _stats(seed: int, n: int = 64, dim: int = 16, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return fid.compute_statistics(rng.normal(size=(n, dim)) @ mix + shift)


def _direct_frechet(mu1, sigma1, mu2, sigma2):
    """tr sqrt(S1 S2) via the symmetric form sqrt(S1) S2 sqrt(S1), in float64."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# ------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_matches_direct_computation():
    a, b = _stats(0), _stats(1, shift=0.5)
    got = fid.frechet_distance(*a, *b)
    assert got == pytest.approx(_direct_frechet(*a, *b), rel=1e-9, abs=1e-9)
    assert got > 1.0


def test_frechet_distance_identical_symmetric_and_1d():
    a, b = _stats(0), _stats(1, shift=0.5)
    assert abs(fid.frechet_distance(*a, *a)) < 1e-6
    assert fid.frechet_distance(*a, *b) == pytest.approx(fid.frechet_distance(*b, *a), rel=1e-9)
    # N(1, 2^2) vs N(-1, 3^2): (1 - -1)^2 + (2 - 3)^2 = 5
    assert fid.frechet_distance([1.0], [[4.0]], [-1.0], [[9.0]]) == pytest.approx(5.0, rel=1e-12)


def test_frechet_distance_regularises_non_finite_sqrtm(monkeypatch):
    a, b = _stats(0), _stats(1, shift=0.5)
    real_sqrtm, calls = fid._sqrtm, []

    def flaky(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(fid, "_sqrtm", flaky)
    eps = 1e-3
    got = fid.frechet_distance(*a, *b, eps=eps)
    identity = np.eye(16)
    np.testing.assert_allclose(calls[1], (a[1] + eps * identity) @ (b[1] + eps * identity))
    # Only the square root sees the offset; the traces are of the covariances as given.
    want = _direct_frechet(a[0], a[1] + eps * identity, b[0], b[1] + eps * identity) - 2 * eps * 16
    assert got == pytest.approx(want, rel=1e-9)


def test_frechet_distance_errors():
    mu, sigma = _stats(0)
    with pytest.raises(ValueError, match="imaginary"):  # sqrtm(-I) = iI: not a covariance
        fid.frechet_distance(mu, -np.eye(16), mu, np.eye(16))
    with pytest.raises(ValueError, match="different dimensions"):
        fid.frechet_distance(mu, sigma, mu[:8], sigma[:8, :8])
    with pytest.raises(ValueError, match="sigma"):
        fid.frechet_distance(mu, sigma[:8], mu, sigma)


def test_compute_statistics_float64_unbiased():
    feats = np.random.default_rng(0).normal(size=(10, 5)).astype(np.float32)
    mu, sigma = fid.compute_statistics(feats)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64).T), rtol=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        fid.compute_statistics(feats[:1])


# ------------------------------------------------------------------------- statistics files


def test_statistics_round_trip(tmp_path):
    mu, sigma = _stats(3)
    for name in ("ref.npz", "ref_without_suffix"):
        fid.save_statistics(tmp_path / name, mu, sigma)
        loaded_mu, loaded_sigma = fid.load_statistics(tmp_path / name)
        np.testing.assert_array_equal(loaded_mu, mu)
        np.testing.assert_array_equal(loaded_sigma, sigma)
        assert loaded_mu.dtype == loaded_sigma.dtype == np.float64


def test_statistics_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no FID statistics file.*save_statistics"):
        fid.load_statistics(tmp_path / "absent.npz")
    np.savez(tmp_path / "wrong.npz", m=np.zeros(3), s=np.eye(3))
    with pytest.raises(KeyError, match="lacks"):
        fid.load_statistics(tmp_path / "wrong.npz")
    with pytest.raises(ValueError, match="mu must be"):
        fid.save_statistics(tmp_path / "bad.npz", np.zeros(3), np.eye(4))


def test_missing_weights_error_names_file_and_url(tmp_path):
    for path in (tmp_path / "nothing.pth", tmp_path):  # a file, and a folder without the file
        with pytest.raises(FileNotFoundError) as info:
            fid.load_inception_params(path)
        assert fid.FID_WEIGHTS_FILE in str(info.value) and fid.FID_WEIGHTS_URL in str(info.value)


def test_wrong_state_dict_is_rejected():
    with pytest.raises(ValueError, match="missing"):
        fid.load_inception_params({"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 3, 3))})
    with pytest.raises(ValueError, match="shape"):
        fid.load_inception_params({"Conv2d_1a_3x3.conv.weight": np.zeros((16, 3, 3, 3))})


def test_image_checks():
    ok = np.zeros((1, 8, 8, 3), np.float32)
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        fid.inception_features(None, ok - 1.0)
    with pytest.raises(ValueError, match="3 channels"):
        fid.inception_features(None, ok[..., :1])
    with pytest.raises(TypeError, match="uint8"):
        fid.inception_features(None, ok.astype(np.int32))


def test_resize_matches_torch_interpolate():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    rng = np.random.default_rng(0)
    for shape in ((37, 53), (64, 64), (400, 512)):  # up, up, down (no antialiasing, as in PyTorch)
        x = rng.random((1, 3, *shape), dtype=np.float32)
        want = torch.nn.functional.interpolate(torch.from_numpy(x), size=(299, 299), mode="bilinear",
                                               align_corners=False).permute(0, 2, 3, 1).numpy()
        got = np.asarray(fid.resize_bilinear(x.transpose(0, 2, 3, 1)))
        assert np.abs(got - want).max() <= 1e-5


# ------------------------------------------------------------------------- the network


def _random_pytorch_fid_network():
    """pytorch-fid's ``InceptionV3([3])`` with random weights and BatchNorm statistics (no download)."""
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    pytest.importorskip("torchvision", reason=TORCH_REASON)
    inception = pytest.importorskip("pytorch_fid.inception", reason=TORCH_REASON)

    torch.manual_seed(0)
    net = inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for name, in_channels, pool_features in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        setattr(net, name, inception.FIDInceptionA(in_channels, pool_features=pool_features))
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        setattr(net, name, inception.FIDInceptionC(768, channels_7x7=c7))
    net.Mixed_7b, net.Mixed_7c = inception.FIDInceptionE_1(1280), inception.FIDInceptionE_2(2048)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):  # He-scaled, so that activations keep their size
                module.weight.normal_(0.0, (2.0 / module.weight[0].numel()) ** 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    state = net.state_dict()

    # InceptionV3(use_fid_inception=True) builds the same network and downloads the weights; hand it ours.
    original = inception.load_state_dict_from_url
    inception.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        model = inception.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)
    finally:
        inception.load_state_dict_from_url = original
    return torch, model.eval(), state


def test_features_match_pytorch_fid(tmp_path):
    torch, model, state = _random_pytorch_fid_network()
    torch.save(state, tmp_path / fid.FID_WEIGHTS_FILE)
    variables = fid.load_inception_params(tmp_path)  # the folder holding the .pth file
    from_mapping = fid.load_inception_params(state)
    jax.tree.map(np.testing.assert_array_equal, variables, from_mapping)

    images = np.random.default_rng(0).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        want = model(x)[0][:, :, 0, 0].numpy()
    got = fid.inception_features(variables, images, batch_size=2)
    assert got.shape == (2, fid.FEATURE_DIM) and got.dtype == np.float32
    scale = np.abs(want).max()
    # measured on CPU (jax 0.10.2, torch 2.14.1): max |diff| 2.4e-6 at a feature scale of 5.8 (4e-7 relative)
    assert np.abs(got - want).max() <= 1e-5 * scale, (np.abs(got - want).max(), scale)
    float_input = fid.inception_features(variables, images.astype(np.float32) / 255.0, batch_size=2)
    np.testing.assert_allclose(float_input, got, rtol=0, atol=1e-6 * scale)


# ------------------------------------------------------------------------- end to end


def _random_flax_variables():
    """The network with He-scaled random kernels and identity BatchNorm; no download, no torch."""
    shapes = jax.eval_shape(fid.FIDInceptionV3().init, jax.random.key(0), jnp.zeros((1, 75, 75, 3)))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
        return (np.ones if name in ("scale", "var") else np.zeros)(leaf.shape, np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.slow  # ~30 s: two 2048x2048 sqrtm on CPU
def test_fid_end_to_end(tmp_path):
    variables = _random_flax_variables()
    rng = np.random.default_rng(0)
    set_a = rng.random((5, 64, 64, 3), dtype=np.float32) * 0.5  # dark noise
    set_b = (rng.random((5, 64, 64, 3)) ** 0.3 * 255).astype(np.uint8)  # bright noise
    feats_a = fid.inception_features(variables, set_a, batch_size=2)  # 3 batches, the last padded
    assert feats_a.shape == (5, fid.FEATURE_DIM) and np.all(np.isfinite(feats_a))
    np.testing.assert_allclose(fid.inception_features(variables, set_a[3:], batch_size=2), feats_a[3:],
                               rtol=1e-5, atol=1e-6 * np.abs(feats_a).max())

    stats_a = fid.compute_statistics(feats_a)
    fid.save_statistics(tmp_path / "a.npz", *stats_a)
    between = fid.fid(set_b, tmp_path / "a.npz", variables, batch_size=2)
    scale = np.trace(stats_a[1]) + stats_a[0] @ stats_a[0]
    assert np.isfinite(between) and between > 1e-3 * scale
    # Against itself: 0 up to sqrtm's error on this rank-4 2048x2048 covariance.
    assert abs(fid.frechet_distance(*stats_a, *stats_a)) <= 1e-5 * scale
