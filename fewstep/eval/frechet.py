"""The Frechet distance between Gaussians fitted to features (FID's formula; Heusel et al. 2017).

d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2}), with unbiased covariances. The trace
of the matrix square root is computed in float64 as Tr sqrt(sqrt(S1) S2 sqrt(S1)) through symmetric
eigendecompositions (S1 S2 is similar to that PSD matrix, so their square roots have the same
trace); eigenvalues within round-off of zero (negative or not) are set to zero. This stays accurate for near-singular
covariances, where scipy.linalg.sqrtm of the non-symmetric product can return complex garbage.
When S1 = G^T G comes from n < D centred samples (G = (F - mean) / sqrt(n - 1), n x D), the nonzero
eigenvalues of S1 S2 are those of the n x n matrix G S2 G^T (AB and BA share them), which is exact and
much cheaper than a D x D eigendecomposition (D = 2048 for Inception).
One implementation serves FD-digits and Inception FID.
"""

from __future__ import annotations

import numpy as np

from fewstep.errors import FewstepError


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased covariance) of an (N, D) feature matrix, in float64."""
    if hasattr(features, "detach"):  # a torch tensor, any dtype or device
        features = features.detach().cpu().double().numpy()
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise FewstepError(f"need an (N >= 2, D) feature matrix, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False, ddof=1).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(s1, s2, factor1=None) -> float:
    """Tr((S1 S2)^{1/2}) for symmetric PSD S1, S2.

    `factor1`: optionally a (k, D) matrix G with S1 = G^T G (e.g. centred features / sqrt(n - 1));
    then the eigenvalues come from the k x k matrix G S2 G^T.
    """
    s2 = np.asarray(s2, dtype=np.float64)
    if factor1 is not None:
        g = np.atleast_2d(np.asarray(factor1, dtype=np.float64))
        m = g @ s2 @ g.T
    else:
        r1 = _psd_sqrt(np.asarray(s1, dtype=np.float64))
        m = r1 @ s2 @ r1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    # eigenvalues within round-off of zero (|w| <= n eps max|w|) are zero: their square roots (~1e-8) would
    # otherwise add noise whose sign depends on the BLAS in use
    tol = w.size * np.finfo(np.float64).eps * (float(np.abs(w).max()) if w.size else 0.0)
    return float(np.sqrt(np.where(w > tol, w, 0.0)).sum())


def frechet_distance(mu1, s1, mu2, s2, *, factor1=None, factor2=None) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2), in float64.

    |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2}); round-off below 0 is clipped to 0.
    `factor1` / `factor2` (optional, (k, D) with S = G^T G) select the exact low-rank route for the
    trace term when one side has fewer samples than dimensions; the smaller factor is used.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise FewstepError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    for g in (factor1, factor2):
        if g is not None and np.atleast_2d(np.asarray(g)).shape[1] != mu1.size:
            raise FewstepError(f"covariance factor of shape {np.shape(g)} does not match dimension {mu1.size}")
    options = [(np.atleast_2d(g).shape[0], g, s) for g, s in ((factor1, s2), (factor2, s1)) if g is not None]
    if options and min(options, key=lambda o: o[0])[0] < mu1.size:
        _, g, other = min(options, key=lambda o: o[0])
        cross = trace_sqrt_product(None, other, factor1=g)
    else:
        cross = trace_sqrt_product(s1, s2)
    diff = mu1 - mu2
    d = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * cross)
    return max(d, 0.0)


def frechet_distance_features(f1, f2) -> float:
    """Frechet distance between two (N, D) feature sets."""
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))
