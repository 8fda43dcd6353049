"""FID: Fréchet distance, statistics files, the Flax FID Inception against pytorch-fid, end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tarflow_jax import fid

TORCH_REASON = "comparing with pytorch-fid needs torch, torchvision and pytorch-fid " \
               "(pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid==0.3.0)"
FIDELITY_REASON = "comparing with torch-fidelity needs torch and torch-fidelity (pip install torch-fidelity==0.4.0)"


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


def test_statistics_record_protocol_and_refuse_a_mismatch(tmp_path):
    mu, sigma = _stats(3)
    fid.save_statistics(tmp_path / "tf.npz", mu, sigma, protocol="torch-fidelity")
    assert fid.statistics_protocol(tmp_path / "tf.npz") == "torch-fidelity"
    fid.load_statistics(tmp_path / "tf.npz", protocol="torch-fidelity")
    with pytest.raises(ValueError, match="computed with protocol 'torch-fidelity'.*'pytorch-fid'"):
        fid.load_statistics(tmp_path / "tf.npz", protocol="pytorch-fid")
    fid.save_statistics(tmp_path / "untagged.npz", mu, sigma)
    assert fid.statistics_protocol(tmp_path / "untagged.npz") is None
    with pytest.warns(UserWarning, match="does not record its protocol"):
        fid.load_statistics(tmp_path / "untagged.npz", protocol="pytorch-fid")
    with pytest.raises(ValueError, match="unknown FID protocol"):
        fid.save_statistics(tmp_path / "x.npz", mu, sigma, protocol="clean-fid")


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
        for name, url in fid.WEIGHTS.values():
            assert name in str(info.value) and url in str(info.value)
        with pytest.raises(FileNotFoundError) as info:
            fid.load_inception_params(path, protocol="torch-fidelity")
        assert fid.TORCH_FIDELITY_WEIGHTS_URL in str(info.value) and fid.FID_WEIGHTS_URL not in str(info.value)


def test_weights_file_prefers_the_protocols_own_file(tmp_path):
    for name, _ in fid.WEIGHTS.values():
        (tmp_path / name).write_bytes(b"")
    assert fid.weights_file(tmp_path, "pytorch-fid").endswith(fid.FID_WEIGHTS_FILE)
    assert fid.weights_file(tmp_path, "torch-fidelity").endswith(fid.TORCH_FIDELITY_WEIGHTS_FILE)
    (tmp_path / fid.TORCH_FIDELITY_WEIGHTS_FILE).unlink()  # the same network: the other file serves
    assert fid.weights_file(tmp_path, "torch-fidelity").endswith(fid.FID_WEIGHTS_FILE)


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


def test_torch_fidelity_input_truncates_floats_like_torchmetrics():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    rng = np.random.default_rng(0)
    x = rng.random((2, 8, 8, 3), dtype=np.float32)
    x.flat[:4] = [0.0, 1.0, 254.5 / 255, np.float32(3) / np.float32(255)]  # edges and a value just at a level
    want = (torch.from_numpy(x) * 255).byte().numpy().astype(np.float32)  # torchmetrics, normalize=True
    np.testing.assert_array_equal(fid.network_input(x, "torch-fidelity"), want)
    levels = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(fid.network_input(levels, "torch-fidelity"), levels.astype(np.float32))
    np.testing.assert_array_equal(fid.network_input(levels, "pytorch-fid"), levels / np.float32(255))
    with pytest.raises(ValueError, match="unknown FID protocol"):
        fid.network_input(levels, "clean-fid")


def test_tf1_resize_matches_torch_fidelity():
    torch = pytest.importorskip("torch", reason=FIDELITY_REASON)
    compat = pytest.importorskip("torch_fidelity.interpolate_compat_tensorflow", reason=FIDELITY_REASON)
    rng = np.random.default_rng(0)
    for shape in ((8, 8), (37, 53), (64, 64), (400, 512)):  # up, up, up, down (no antialiasing)
        x = rng.integers(0, 256, (1, 3, *shape)).astype(np.float32)
        want = compat.interpolate_bilinear_2d_like_tensorflow1x(
            torch.from_numpy(x), size=(299, 299), align_corners=False).permute(0, 2, 3, 1).numpy()
        got = np.asarray(fid.resize_bilinear_tf1(x.transpose(0, 2, 3, 1)))
        # Same grid and operation order: equal up to rounding of the last bit (values 0..255).
        assert np.abs(got - want).max() <= 255 * 1e-6, (shape, np.abs(got - want).max())
        other = np.asarray(fid.resize_bilinear(x.transpose(0, 2, 3, 1)))
        assert np.abs(other - want).max() > 1.0  # the two protocols' resizes really differ


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
    """pytorch-fid's ``InceptionV3([3])`` with random weights and BatchNorm statistics (no download).

    Returns ``(torch, model, state)``; ``state`` is the random state dict, whose names also fit
    torch-fidelity's ``FeatureExtractorInceptionV3``.
    """
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
    variables = fid.load_inception_params(tmp_path, protocol="pytorch-fid")  # the folder holding the .pth
    from_mapping = fid.load_inception_params(state)
    jax.tree.map(np.testing.assert_array_equal, variables, from_mapping)

    images = np.random.default_rng(0).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        want = model(x)[0][:, :, 0, 0].numpy()
    got = fid.inception_features(variables, images, batch_size=2, protocol="pytorch-fid")
    assert got.shape == (2, fid.FEATURE_DIM) and got.dtype == np.float32
    scale = np.abs(want).max()
    # measured on CPU (jax 0.10.2, torch 2.14.1): max |diff| 2.4e-6 at a feature scale of 5.8 (4e-7 relative)
    assert np.abs(got - want).max() <= 1e-5 * scale, (np.abs(got - want).max(), scale)
    float_input = fid.inception_features(variables, images.astype(np.float32) / 255.0, batch_size=2,
                                         protocol="pytorch-fid")
    np.testing.assert_allclose(float_input, got, rtol=0, atol=1e-6 * scale)


def _random_torch_fidelity_network(tmp_path):
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (FID features) with the same random weights."""
    torch, _, state = _random_pytorch_fid_network()
    extractor = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3", reason=FIDELITY_REASON)
    path = tmp_path / fid.TORCH_FIDELITY_WEIGHTS_FILE
    torch.save(state, path)
    net = extractor.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                feature_extractor_weights_path=str(path))
    return torch, net.eval(), state


def test_features_match_torch_fidelity(tmp_path):
    torch, net, state = _random_torch_fidelity_network(tmp_path)
    variables = fid.load_inception_params(tmp_path, protocol="torch-fidelity")
    rng = np.random.default_rng(1)
    for size in (32, 64):  # both upsampled to 299 by the TF1 resize
        images = rng.integers(0, 256, size=(2, size, size, 3), dtype=np.uint8)
        with torch.no_grad():
            want = net(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())[0].numpy()
        got = fid.inception_features(variables, images, batch_size=2)  # the default protocol
        scale = np.abs(want).max()
        assert got.shape == (2, fid.FEATURE_DIM) and got.dtype == np.float32
        assert np.abs(got - want).max() <= 1e-5 * scale, (size, np.abs(got - want).max(), scale)
        # The other protocol on the same images and weights gives clearly different features.
        other = fid.inception_features(variables, images, batch_size=2, protocol="pytorch-fid")
        assert np.abs(other - want).max() > 1e-3 * scale
    # Float samples in [0, 1] go through torchmetrics' truncation to uint8 first.
    floats = rng.random((2, 32, 32, 3), dtype=np.float32)
    with torch.no_grad():
        want = net((torch.from_numpy(floats).permute(0, 3, 1, 2) * 255).byte())[0].numpy()
    got = fid.inception_features(variables, floats, batch_size=2)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


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
    fid.save_statistics(tmp_path / "a.npz", *stats_a, protocol=fid.DEFAULT_PROTOCOL)
    between = fid.fid(set_b, tmp_path / "a.npz", variables, batch_size=2)
    scale = np.trace(stats_a[1]) + stats_a[0] @ stats_a[0]
    assert np.isfinite(between) and between > 1e-3 * scale
    # Against itself: 0 up to sqrtm's error on this rank-4 2048x2048 covariance.
    assert abs(fid.frechet_distance(*stats_a, *stats_a)) <= 1e-5 * scale
