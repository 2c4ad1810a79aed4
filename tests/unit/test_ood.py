"""Out-of-distribution scores (resflow_mpi.ood): the conformal rule, k-NN
scores on known points, the stored form, and the gallery's refusal of another window size."""
from __future__ import annotations

import math

import numpy as np
import pytest

from resflow_mpi.ood import EmbeddingReference, conformal_threshold


def test_conformal_threshold_is_the_ceil_q_n_plus_1_th_smallest() -> None:
    s = np.arange(1, 20, dtype=float)[::-1]  # 19 scores, 1..19, shuffled order
    assert conformal_threshold(s, 0.9) == 18.0   # ceil(0.9 * 20) = 18
    assert conformal_threshold(s, 0.5) == 10.0   # ceil(0.5 * 20) = 10
    assert conformal_threshold(s, 0.99) == 19.0  # ceil(19.8) = 20 > n: capped at the largest
    assert math.isinf(conformal_threshold(np.zeros(0), 0.9))


def test_knn_scores_and_stored_form() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 4)).astype(np.float32)
    cal = rng.normal(size=(100, 4)).astype(np.float32)
    r = EmbeddingReference.fit(ref, cal, k=5, window_px=96)
    z = (ref - ref.mean(0)) / (ref.std(0) + 1e-6)
    np.testing.assert_allclose(r.reference, z, rtol=1e-5, atol=1e-5)
    # A reference point's score is the mean of its 5 nearest distances, itself (0) included.
    d = np.linalg.norm(z[:1, None] - z[None], axis=2)[0]
    assert r.scores(ref[:1])[0] == pytest.approx(np.sort(d)[:5].mean(), rel=1e-4)
    # Far points score far above the calibration windows' threshold; new draws mostly below.
    th = r.threshold(0.95)
    assert (r.scores(ref.mean(0) + 10 * ref.std(0) * np.ones((5, 4), np.float32)) > th).all()
    new = rng.normal(size=(2000, 4)).astype(np.float32)
    assert 0.01 < (r.scores(new) > th).mean() < 0.12  # ~5 % by the conformal guarantee
    back = EmbeddingReference.from_arrays(r.arrays())
    assert back.k == 5 and back.window_px == 96
    np.testing.assert_array_equal(back.scores(new[:50]), r.scores(new[:50]))
