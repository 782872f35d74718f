"""Fréchet distance between two Gaussians fitted to image features (FID; the paper's MJHQ-30K FID 9.51).

Follows pytorch-fid's `calculate_frechet_distance` (clean-fid's `frechet_distance` is the same code):
  d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 @ sigma2))
with sqrtm of the (non-symmetric) product; if the result is not finite, eps (1e-6) is added to both diagonals and
sqrtm retried; an imaginary part is dropped if the diagonal's imaginary parts are within 1e-3 of 0, else a
ValueError. `gaussian_stats` is their `np.mean(act, axis=0)`, `np.cov(act, rowvar=False)`.

The matrix square root: `scipy.linalg.sqrtm` (what both tools call) when scipy is importable — in this project it
comes with scikit-learn, a declared dependency — else a numpy-only eigendecomposition V diag(sqrt(w)) V^-1 of the
product (exact for a diagonalisable product; sigma1 @ sigma2 of two covariance matrices is similar to a symmetric
PSD matrix, so it is). The two agree to ~1e-8 on well-conditioned inputs; near-singular products (fewer samples than
feature dimensions) can differ in the last digits, as sqrtm's own result does between scipy versions.
The features themselves (InceptionV3 pool3 activations of MJHQ-30K and of the generated images) are computed
elsewhere; this module only does the arithmetic.
"""

from __future__ import annotations

import warnings

import numpy as np


def _sqrtm_numpy(matrix: np.ndarray) -> np.ndarray:
    """V diag(sqrt(w)) V^-1; NaN when V is numerically singular (a defective product, which has no square root of
    this form), so that the caller's eps retry runs, as it does when scipy's sqrtm fails."""
    eigenvalues, vectors = np.linalg.eig(matrix)
    if not np.isfinite(vectors).all() or np.linalg.cond(vectors) > 1 / np.finfo(np.float64).eps:
        return np.full(matrix.shape, np.nan, dtype=np.complex128)
    root = np.sqrt(eigenvalues.astype(np.complex128))
    return (vectors * root) @ np.linalg.inv(vectors)


def sqrtm(matrix: np.ndarray, use_scipy: bool | None = None) -> np.ndarray:
    """Principal square root of a square matrix (possibly complex): scipy's if available (or `use_scipy`), else the
    eigendecomposition's."""
    if use_scipy is None or use_scipy:
        try:
            from scipy import linalg
        except ImportError:
            if use_scipy:
                raise
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Matrix is singular ..." is handled by the caller's retry
                out = linalg.sqrtm(matrix)
            return out[0] if isinstance(out, tuple) else out
    return _sqrtm_numpy(matrix)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, use_scipy: bool | None = None) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), as pytorch-fid computes it."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different lengths: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"covariances have different dimensions: {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = sqrtm(sigma1 @ sigma2, use_scipy)
    if not np.isfinite(covmean).all():
        # pytorch-fid prints this and retries with an offset.
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates",
                      stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = sqrtm((sigma1 + offset) @ (sigma2 + offset), use_scipy)
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of [num_images, dims] features, as pytorch-fid's calculate_activation_statistics."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [num_images >= 2, dims], got shape {features.shape}")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def fid_from_features(features1: np.ndarray, features2: np.ndarray, **kwargs) -> float:
    return frechet_distance(*gaussian_stats(features1), *gaussian_stats(features2), **kwargs)
