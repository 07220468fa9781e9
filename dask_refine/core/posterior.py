"""Posterior weights over poses and classes (the expectation of a marginalised E-step).

The noise-whitened error ``E`` of a pose (:mod:`.pose_search`) is −2 log-likelihood up to a
constant per particle, so a particle's posterior over the poses its search kept is

    p_j ∝ π_j · exp(−(E_j − E_min) / 2)

with ``π_j`` the prior of pose j's class (uniform over poses within a class, as RELION's
expectation step with flat orientational priors). RELION keeps the *significant* poses: the
largest weights whose sum reaches ``significant_fraction`` (its ``adaptive_fraction``,
0.999) of the mass; the rest are dropped and the kept weights renormalised. A particle's
log-evidence over what was kept, ``log Σ_j π_j exp(−E_j / 2)``, is its log-likelihood
contribution (RELION's ``rlnLogLikeliContribution`` up to the per-pixel constant, the same for
every particle of an iteration), and the largest weight its ``rlnMaxValueProbDistribution``.
"""

from __future__ import annotations

import numpy as np


def significant_poses(errors, log_prior=None, significant_fraction: float = 0.999,
                      max_poses: int | None = None):
    """Posterior of one particle over candidate poses.

    ``errors`` ``(m,)``: −2 log-likelihoods; ``log_prior`` ``(m,)`` (default 0). Returns
    ``(indices, weights, log_evidence)``: the significant candidates (largest weight first,
    at least one, at most ``max_poses``), their renormalised weights (sum 1) and
    ``log Σ_j π_j exp(−E_j/2)`` over all candidates.
    """
    e = np.asarray(errors, np.float64)
    logp = -0.5 * e + (0.0 if log_prior is None else np.asarray(log_prior, np.float64))
    top = float(logp.max())
    w = np.exp(logp - top)
    total = w.sum()
    order = np.argsort(-w, kind="stable")
    cum = np.cumsum(w[order]) / total
    n_keep = int(np.searchsorted(cum, significant_fraction - 1e-12) + 1)
    n_keep = min(n_keep, order.size, max_poses or order.size)
    keep = order[:n_keep]
    kept = w[keep]
    return keep, kept / kept.sum(), top + float(np.log(total))


def class_evidence(class_errors: list, log_class_prior=None) -> np.ndarray:
    """Log-evidence of each class for one particle: ``log π_k + log Σ_j exp(−E_kj / 2)`` over
    the poses class ``k``'s search kept (``class_errors[k]``, an array each)."""
    k = len(class_errors)
    lp = np.zeros(k) if log_class_prior is None else np.asarray(log_class_prior, np.float64)
    out = np.empty(k)
    for i, e in enumerate(class_errors):
        e = -0.5 * np.asarray(e, np.float64)
        top = e.max()
        out[i] = lp[i] + top + np.log(np.exp(e - top).sum())
    return out


def softmax(log_weights, axis: int = -1) -> np.ndarray:
    """``exp(l) / Σ exp(l)`` along ``axis``, computed stably."""
    lw = np.asarray(log_weights, np.float64)
    w = np.exp(lw - lw.max(axis=axis, keepdims=True))
    return w / w.sum(axis=axis, keepdims=True)
