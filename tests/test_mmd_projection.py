"""Projections fitted on the reference: PCA keeps the top variance, JL keeps distances, the
identity is explicit, and everything round-trips through an npz without pickle."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.signals.projection import Projection, fit_projection
from mmd_helpers import gaussian_rows


def test_pca_projects_onto_the_top_variance_axes() -> None:
    rng = np.random.default_rng(0)
    x = gaussian_rows(rng, 400, 10) * np.array([5.0, 3.0] + [0.1] * 8, dtype=np.float32) + 7.0
    proj = fit_projection(x, "pca", 2, seed=0)
    z = proj.apply(x)
    assert z.dtype == np.float32 and z.shape == (400, 2)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-3)
    # The two retained axes carry (almost) all the variance of the two wide dims.
    assert z.var(0) == pytest.approx([25.0, 9.0], rel=0.2)
    np.testing.assert_allclose(np.abs(proj.matrix[:2]), np.eye(2), atol=0.05)


def test_random_projection_preserves_pairwise_distances_on_average() -> None:
    x = gaussian_rows(np.random.default_rng(1), 60, 512)
    z = fit_projection(x, "random", 64, seed=3).apply(x)
    d_in = np.linalg.norm(x[:, None] - x[None], axis=-1)[np.triu_indices(60, 1)]
    d_out = np.linalg.norm(z[:, None] - z[None], axis=-1)[np.triu_indices(60, 1)]
    assert np.median(d_out / d_in) == pytest.approx(1.0, abs=0.1)
    assert np.array_equal(z, fit_projection(x, "random", 64, seed=3).apply(x))


@pytest.mark.parametrize(("kind", "dims", "note"), [("none", 4, ""), ("pca", 8, "only 8 dims"), ("random", 50, "only 8")])
def test_identity_when_asked_or_when_dims_cover_the_input(kind: str, dims: int, note: str) -> None:
    x = gaussian_rows(np.random.default_rng(2), 20, 8)
    proj = fit_projection(x, kind, dims, seed=0)
    assert proj.identity and proj.output_dims == 8
    assert note in proj.note
    np.testing.assert_array_equal(proj.apply(x), x)


@pytest.mark.parametrize("kind", ["pca", "random", "none"])
def test_projection_round_trips_through_npz_without_pickle(tmp_path, kind: str) -> None:
    rng = np.random.default_rng(3)
    x, y = gaussian_rows(rng, 50, 12), gaussian_rows(rng, 7, 12)
    proj = fit_projection(x, kind, 5, seed=9)
    np.savez(tmp_path / "p.npz", **proj.to_arrays())
    with np.load(tmp_path / "p.npz", allow_pickle=False) as data:
        loaded = Projection.from_arrays(dict(data))
    assert (loaded.kind, loaded.input_dims, loaded.output_dims, loaded.note) == (
        proj.kind, proj.input_dims, proj.output_dims, proj.note
    )
    np.testing.assert_array_equal(loaded.apply(y), proj.apply(y))


def test_bad_projection_requests_and_inputs_are_rejected() -> None:
    x = gaussian_rows(np.random.default_rng(4), 10, 40)
    with pytest.raises(ValueError, match="kind must be one of"):
        fit_projection(x, "umap", 4, seed=0)
    with pytest.raises(ValueError, match="dims must be an integer >= 1"):
        fit_projection(x, "pca", 0, seed=0)
    with pytest.raises(ValueError, match="at least 20 reference rows"):
        fit_projection(x, "pca", 20, seed=0)
    with pytest.raises(ValueError, match="expected 40 feature columns"):
        fit_projection(x, "pca", 4, seed=0).apply(x[:, :39])
    with pytest.raises(ValueError, match="missing key"):
        Projection.from_arrays({"kind": np.array("pca")})
