"""The Monte-Carlo draws' normals and correlation factors as torch operations, for devices.

On a GPU node the cores, not the GPU, bound the Monte-Carlo encode when every draw's normals
and every row's Cholesky factors are made on the host. These are the same computations on the
kernel's device: SplitMix64 in int64 arithmetic (multiplications wrap modulo 2**64 and shifts are
masked to be logical, so the uniforms equal :func:`xpbatch.encode.mc.standard_normals`' bit for
bit; the logarithm and sines then differ from numpy's by float32 round-off), and a batched
Cholesky (``torch.linalg.cholesky_ex``) with the same shrinkage towards the identity for a
matrix that is not positive definite.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

GAMMA = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
_U64 = 2**64


def _signed(value: int) -> int:
    """A uint64 as the int64 with the same bits."""
    value %= _U64
    return value - _U64 if value >= 2**63 else value


def _mix_int(z: int) -> int:
    """SplitMix64's output function on a Python int (exact uint64 arithmetic)."""
    z %= _U64
    z = ((z ^ (z >> 30)) * MIX1) % _U64
    z = ((z ^ (z >> 27)) * MIX2) % _U64
    return z ^ (z >> 31)


def _shift(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 words (torch's is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on int64 words (wrapping products)."""
    z = (z ^ _shift(z, 30)) * _signed(MIX1)
    z = (z ^ _shift(z, 27)) * _signed(MIX2)
    return z ^ _shift(z, 31)


def standard_normals(source_id: torch.Tensor, seed: int, n: int) -> torch.Tensor:
    """(rows, n) float32 standard normals on ``source_id``'s device: the torch form of
    :func:`xpbatch.encode.mc.standard_normals` (n even)."""
    half = n // 2
    key = _signed(_mix_int(seed + GAMMA))
    state = _mix(source_id.to(torch.int64) ^ key)  # (rows,)
    offsets = _offsets(half, source_id.device)
    z = _mix(state[:, None] + offsets[None, :])  # (rows, half)
    scale = torch.tensor(np.float32(1.0 / 16777216.0), device=source_id.device)
    two_pi = torch.tensor(np.float32(2.0 * math.pi / 16777216.0), device=source_id.device)
    u = ((_shift(z, 40) & 0xFFFFFF).to(torch.float32) + 0.5) * scale
    angle = (z & 0xFFFFFF).to(torch.float32) * two_pi
    radius = torch.sqrt(-2.0 * torch.log(u))
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)


@functools.lru_cache(maxsize=8)
def _offsets(half: int, device: torch.device) -> torch.Tensor:
    """(half,) int64 ``(j + 1) * gamma`` modulo 2**64: a row's counters, made once per device."""
    steps = [_signed((j + 1) * GAMMA) for j in range(half)]
    return torch.tensor(steps, dtype=torch.int64, device=device)


def correlation_factors(packed: torch.Tensor, m: int, shrinkage: tuple[float, ...]) -> torch.Tensor:
    """(rows, m, m) lower Cholesky factors of packed strict lower triangles (rows, m(m-1)/2),
    row-major as DR3 stores them; the identity for a row with a non-finite value; a matrix that
    is not positive definite shrunk towards the identity by the first of ``shrinkage`` that
    makes it so."""
    rows = packed.shape[0]
    i, j = np.tril_indices(m, k=-1)
    i_t = torch.as_tensor(i, device=packed.device)
    j_t = torch.as_tensor(j, device=packed.device)
    eye = torch.eye(m, dtype=torch.float32, device=packed.device)
    finite = torch.isfinite(packed).all(dim=1)  # (rows,)
    values = torch.where(finite[:, None], packed.float(), 0.0)
    factors = eye.repeat(rows, 1, 1)
    failing = torch.ones(rows, dtype=torch.bool, device=packed.device)
    for s in shrinkage:
        matrix = eye.repeat(rows, 1, 1)
        matrix[:, i_t, j_t] = (1.0 - s) * values
        matrix[:, j_t, i_t] = (1.0 - s) * values
        found, info = torch.linalg.cholesky_ex(matrix)
        factors = torch.where(failing[:, None, None], found, factors)
        failing &= info != 0
        if not bool(failing.any()):
            break
    factors[failing] = eye  # only if even the identity failed, which it cannot
    return factors
