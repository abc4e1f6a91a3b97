"""Ridge-regression probes (idesign.probes.fit_ridge) against the closed form."""

from __future__ import annotations

import numpy as np
import pytest

from idesign import probes


def test_ridge_probes_match_the_closed_form_and_decode_what_is_there():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)) * [1, 2, 3, 1, 1, 1] + 4.0
    y = np.stack([x[:, 1] - 2 * x[:, 2], rng.normal(size=300)], 1)
    fit = probes.fit_ridge(x, y, alpha=0.0)
    assert fit.r2[0] > 0.999 and fit.r2[1] < 0.05
    # With alpha = 0 the refit is ordinary least squares.
    design = np.concatenate([x, np.ones((300, 1))], 1)
    ols = np.linalg.lstsq(design, y, rcond=None)[0]
    np.testing.assert_allclose(probes.predict_ridge(fit.probe, x), design @ ols, atol=1e-8)
    with pytest.raises(ValueError, match="same N"):
        probes.fit_ridge(x, y[:10])
