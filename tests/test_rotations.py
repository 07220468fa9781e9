import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dask_refine.core.rotations import (angular_distance_deg, euler_to_matrix, matrix_to_euler,
                                        random_rotations)


def _rz(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1.0]])


def _ry(b):
    c, s = np.cos(b), np.sin(b)
    return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])


def test_matches_relion_zyz_composition():
    # RELION's Euler_angles2matrix is A = Rz(psi) · Ry(tilt) · Rz(rot) with the rotations above.
    rng = np.random.default_rng(0)
    for rot, tilt, psi in rng.uniform([-180, 0, -180], [180, 180, 180], (20, 3)):
        expected = _rz(np.deg2rad(psi)) @ _ry(np.deg2rad(tilt)) @ _rz(np.deg2rad(rot))
        np.testing.assert_allclose(euler_to_matrix(rot, tilt, psi), expected, atol=1e-12)


def test_known_angles():
    np.testing.assert_allclose(euler_to_matrix(0, 0, 0), np.eye(3), atol=1e-15)
    np.testing.assert_allclose(euler_to_matrix(90, 0, 0), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]],
                               atol=1e-15)
    np.testing.assert_allclose(euler_to_matrix(0, 90, 0), [[0, 0, -1], [0, 1, 0], [1, 0, 0]],
                               atol=1e-15)


@settings(max_examples=200, deadline=None)
@given(st.floats(-180, 180), st.floats(0.01, 179.99), st.floats(-180, 180))
def test_euler_round_trip(rot, tilt, psi):
    A = euler_to_matrix(rot, tilt, psi)
    back = euler_to_matrix(*matrix_to_euler(A))
    np.testing.assert_allclose(back, A, atol=1e-9)
    r2, t2, p2 = matrix_to_euler(A)
    assert abs(float(t2) - tilt) < 1e-6


def test_round_trip_at_poles():
    for tilt in (0.0, 180.0):
        A = euler_to_matrix(30.0, tilt, 40.0)
        np.testing.assert_allclose(euler_to_matrix(*matrix_to_euler(A)), A, atol=1e-12)


def test_random_rotations_are_uniform_rotations():
    R = random_rotations(20000, np.random.default_rng(3))
    np.testing.assert_allclose(np.einsum("nij,nkj->nik", R, R), np.broadcast_to(np.eye(3), R.shape),
                               atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)
    # Haar measure: E[R] = 0 and the viewing direction is uniform on the sphere
    assert np.abs(R.mean(axis=0)).max() < 0.02
    assert abs(np.mean(R[:, 2, 2] > 0.5) - 0.25) < 0.02


def test_angular_distance():
    a = euler_to_matrix(10, 20, 30)
    b = euler_to_matrix(10, 20, 37)
    assert abs(float(angular_distance_deg(a, b)) - 7.0) < 1e-9
