"""The scatter VAE network and loss against the published checkpoint and reference outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xpbatch.config import ModelConfig
from xpbatch.errors import ConfigError
from xpbatch.model.network import ScatterVAE, scatter_vae_loss


@pytest.fixture(scope="module")
def published(reference_dir):
    """The published network in eval mode and its reference outputs."""
    checkpoint = torch.load(reference_dir / "weight.pt", map_location="cpu", weights_only=True)
    net = ScatterVAE()
    net.load_state_dict(checkpoint["model_state_dict"], strict=True)
    return net.eval(), dict(np.load(reference_dir / "reference_outputs.npz"))


def test_state_dict_keys_are_the_published_ones(reference_dir):
    checkpoint = torch.load(reference_dir / "weight.pt", map_location="cpu", weights_only=True)
    published = {k: tuple(v.shape) for k, v in checkpoint["model_state_dict"].items()}
    ours = {k: tuple(v.shape) for k, v in ScatterVAE().state_dict().items()}
    assert ours == published


def test_forward_reproduces_reference_outputs(published):
    net, ref = published
    with torch.no_grad():
        out = net(torch.from_numpy(ref["x"]))
    for name in ("mu", "log_var", "xhat", "shat"):
        np.testing.assert_allclose(getattr(out, name).numpy(), ref[name], rtol=0, atol=1e-4)


def test_loss_terms_match_reference_to_1e4_relative(published):
    net, ref = published
    with torch.no_grad():
        out = net(torch.from_numpy(ref["x"]))
        loss = scatter_vae_loss(out, torch.from_numpy(ref["x"]), torch.from_numpy(ref["x_err"]))
    np.testing.assert_allclose(loss.weighted_mse.item(), ref["weighted_mse_loss"], rtol=1e-4)
    np.testing.assert_allclose(loss.kld.item(), ref["kld"], rtol=1e-4)
    np.testing.assert_allclose(loss.total.item(), ref["weighted_mse_loss"] + ref["kld"], rtol=1e-4)


def test_kl_weight_scales_only_the_kl_term(published):
    net, ref = published
    x, e = torch.from_numpy(ref["x"][:64]), torch.from_numpy(ref["x_err"][:64])
    with torch.no_grad():
        out = net(x)
        one = scatter_vae_loss(out, x, e)
        half = scatter_vae_loss(out, x, e, kl_weight=0.5)
    assert half.total.item() == pytest.approx(one.weighted_mse.item() + 0.5 * one.kld.item())


def test_masked_coefficients_do_not_contribute_to_the_loss():
    torch.manual_seed(0)
    net = ScatterVAE().eval()
    x, e = torch.randn(8, 110), torch.rand(8, 110) + 0.1
    valid = torch.ones(8, 110, dtype=torch.bool)
    valid[:, :55] = False  # BP missing
    with torch.no_grad():
        out = net(x)
        masked = scatter_vae_loss(out, x, e, valid)
        garbage = x.clone()
        garbage[:, :55] = 1e6  # whatever sits in masked places must not matter
        masked_garbage = scatter_vae_loss(
            type(out)(mu=out.mu, log_var=out.log_var, xhat=out.xhat, shat=out.shat),
            garbage,
            e,
            valid,
        )
    assert masked.weighted_mse.item() == pytest.approx(masked_garbage.weighted_mse.item())
    w = e[:, 55:] ** 2 + out.shat[:, 55:] ** 2
    expected = (0.5 * ((x[:, 55:] - out.xhat[:, 55:]) ** 2 / w + torch.log(w))).sum(1).mean()
    assert masked.weighted_mse.item() == pytest.approx(expected.item(), rel=1e-6)


def test_inference_is_deterministic_and_sampling_is_seeded():
    torch.manual_seed(1)
    net = ScatterVAE().eval()
    x = torch.randn(16, 110)
    with torch.no_grad():
        a, b = net(x), net(x)
        assert torch.equal(a.xhat, b.xhat) and torch.equal(a.shat, b.shat)
        s1 = net(x, sample=True, generator=torch.Generator().manual_seed(3))
        s2 = net(x, sample=True, generator=torch.Generator().manual_seed(3))
        assert torch.equal(s1.xhat, s2.xhat)
        assert not torch.equal(s1.xhat, a.xhat)


@pytest.mark.parametrize(
    "config, n_params",
    [
        pytest.param(ModelConfig(), None, id="published"),
        pytest.param(
            ModelConfig(input_dim=90, hidden_widths=(64, 16), latent_dim=3), None, id="dr4"
        ),
    ],
)
def test_architecture_is_configuration(config, n_params):
    net = ScatterVAE(config).eval()
    with torch.no_grad():
        out = net(torch.zeros(2, config.input_dim))
    assert out.mu.shape == (2, config.latent_dim)
    assert out.xhat.shape == out.shat.shape == (2, config.input_dim)
    assert ((out.shat > 0) & (out.shat < 1)).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"input_dim": 0}, id="no-inputs"),
        pytest.param({"latent_dim": 0}, id="no-latents"),
        pytest.param({"hidden_widths": ()}, id="no-layers"),
        pytest.param({"hidden_widths": (90, -1)}, id="negative-width"),
    ],
)
def test_invalid_architecture_is_refused(kwargs):
    with pytest.raises(ConfigError):
        ModelConfig(**kwargs)
