"""The scatter VAE of Laroche & Speagle (2024) and its loss; torch only, no file I/O.

The module layout reproduces the authors' state-dict key names exactly
(``encoder.{i}.0`` Linear, ``encoder.{i}.1`` BatchNorm1d, ``mu``, ``log_var``,
``decoder.0``, ``decoder.{1..n}.0/.1``, ``decoder.{n+1}.0``, and the same for ``scatter``),
so the published checkpoint loads without renaming.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from xpbatch.config import ModelConfig


def _block(n_in: int, n_out: int) -> nn.Sequential:
    """Linear -> BatchNorm1d -> GELU, as one numbered block of the published model."""
    return nn.Sequential(nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.GELU())


def _decoder(config: ModelConfig, *, final: nn.Module | None) -> nn.Sequential:
    """Linear(latent -> last width), blocks up the widths, Linear(first width -> input)."""
    widths = list(reversed(config.hidden_widths))  # e.g. 10, 30, 50, 70, 90
    layers: list[nn.Module] = [nn.Linear(config.latent_dim, widths[0])]
    layers += [_block(a, b) for a, b in itertools.pairwise(widths)]
    head: list[nn.Module] = [nn.Linear(widths[-1], config.input_dim)]
    if final is not None:
        head.append(final)
    layers.append(nn.Sequential(*head))
    return nn.Sequential(*layers)


def _full_precision(t: torch.Tensor) -> torch.autocast:
    """A region where autocast is off (its ops run in the inputs' dtype, float32 here)."""
    return torch.autocast(t.device.type, enabled=False)


def _with_fp32_head(layers: nn.Sequential, z: torch.Tensor) -> torch.Tensor:
    """Run ``layers`` with the last one (the output head) in float32 even under autocast."""
    h = layers[:-1](z)  # (batch, first width)
    with _full_precision(h):
        return layers[-1](h.float())  # type: ignore[no-any-return]


@dataclass(frozen=True)
class VAEOutput:
    """Everything one forward pass produces, in the model's standardised space."""

    mu: torch.Tensor  # (batch, latent) posterior mean
    log_var: torch.Tensor  # (batch, latent) posterior log-variance
    xhat: torch.Tensor  # (batch, input) reconstruction
    shat: torch.Tensor  # (batch, input) predicted intrinsic scatter, in (0, 1)


class ScatterVAE(nn.Module):
    """MLP VAE with a second decoder that predicts each coefficient's intrinsic scatter.

    Parameters
    ----------
    config
        Architecture; the default is the published one (110 -> 90 -> 70 -> 50 -> 30 -> 10 -> 6).

    Examples
    --------
    >>> import torch
    >>> net = ScatterVAE().eval()
    >>> out = net(torch.zeros(3, 110))
    >>> tuple(out.mu.shape), tuple(out.shat.shape)
    ((3, 6), (3, 110))
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        widths = [self.config.input_dim, *self.config.hidden_widths]
        self.encoder = nn.Sequential(*[_block(a, b) for a, b in itertools.pairwise(widths)])
        self.mu = nn.Linear(widths[-1], self.config.latent_dim)
        self.log_var = nn.Linear(widths[-1], self.config.latent_dim)
        self.decoder = _decoder(self.config, final=None)
        self.scatter = _decoder(self.config, final=nn.Sigmoid())

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance of standardised coefficients ``x`` (batch, input)."""
        h = self.encoder(x)  # (batch, last width)
        with _full_precision(h):  # the heads stay float32 under bf16 autocast
            h = h.float()
            return self.mu(h), self.log_var(h)  # (batch, latent) each

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and scatter (both (batch, input)) at latent points ``z``."""
        return _with_fp32_head(self.decoder, z), _with_fp32_head(self.scatter, z)

    def forward(
        self, x: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> VAEOutput:
        """Encode and decode.

        With ``sample=False`` (inference) both decoders run at the posterior mean, so the result
        is deterministic. With ``sample=True`` (training) they run at ``mu + eps * std`` with the
        reparametrisation trick, ``eps`` drawn from ``generator`` when given.
        """
        mu, log_var = self.encode(x)
        if sample:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            z = mu + eps * torch.exp(0.5 * log_var)
        else:
            z = mu
        xhat, shat = self.decode(z)
        return VAEOutput(mu=mu, log_var=log_var, xhat=xhat, shat=shat)


@dataclass(frozen=True)
class LossTerms:
    """The two terms of the loss and their weighted sum (all scalars)."""

    total: torch.Tensor
    weighted_mse: torch.Tensor
    kld: torch.Tensor


def scatter_vae_loss(
    out: VAEOutput,
    x: torch.Tensor,
    x_err: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    kl_weight: float = 1.0,
) -> LossTerms:
    """Loss of the scatter VAE exactly as the published implementation computes it.

    ``weighted_mse = mean_rows( sum_j 1/2 [ (x - xhat)^2 / w + log w ] )`` with
    ``w = x_err^2 + shat^2``, and
    ``kld = mean_rows( -1/2 sum_k (1 + log_var - mu^2 - exp(log_var)) )``;
    ``total = weighted_mse + kl_weight * kld``.

    Note: the paper's printed equations normalise the KL term differently (per latent dimension
    and per coefficient); the authors' code, which produced the published checkpoint, sums over
    coefficients and latent dimensions and averages over spectra, as done here. ``kl_weight=1``
    reproduces it.

    Coefficients with ``valid == False`` (a missing band, a non-finite value) contribute nothing
    to ``weighted_mse``, so a spectrum with one band missing still trains on the band it has.
    All tensors are (batch, input) except ``out.mu``/``out.log_var`` (batch, latent).
    """
    w = x_err**2 + out.shat**2
    per_coeff = 0.5 * ((x - out.xhat) ** 2 / w + torch.log(w))  # (batch, input)
    if valid is not None:
        per_coeff = torch.where(valid, per_coeff, torch.zeros_like(per_coeff))
    weighted_mse = per_coeff.sum(dim=1).mean()
    kld = (-0.5 * (1 + out.log_var - out.mu**2 - torch.exp(out.log_var)).sum(dim=1)).mean()
    return LossTerms(total=weighted_mse + kl_weight * kld, weighted_mse=weighted_mse, kld=kld)


def reconstruction_rmse(
    x: torch.Tensor, xhat: torch.Tensor, x_err: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    """(batch,) ``sqrt(mean over valid j of ((x_j - xhat_j) / x_err_j)^2)``, all (batch, input).

    The catalogue's ``rmse`` (eq. 7 of Laroche & Speagle 2024, over the valid coefficients).
    """
    z = (x - xhat) / x_err
    if valid is None:
        return torch.sqrt((z**2).mean(dim=1))
    z = torch.where(valid, z, torch.zeros_like(z))
    return torch.sqrt((z**2).sum(dim=1) / valid.sum(dim=1))
