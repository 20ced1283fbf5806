"""Tests for the fixed SMPL surface samples behind the 3D tokens (isa4d.body.surface)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from isa4d.body import PART_NAMES, BodyModel, part_ids
from isa4d.body.surface import (
    BodySurface, SurfaceSamples, _face_areas, _random_area_samples, face_part_ids, pose_points,
    sample_surface,
)

N = 512


@pytest.fixture(scope="module")
def body(toy_body_dir):
    return BodyModel(toy_body_dir)


@pytest.fixture(scope="module")
def parts(toy_body_dir):
    return part_ids(toy_body_dir)


@pytest.fixture(scope="module")
def rest(body):
    return body.smpl.v_template.detach().double().numpy(), body.faces.numpy()


@pytest.fixture(scope="module")
def samples(body):
    return sample_surface(body.smpl.v_template, body.faces, N, seed=0)


def _random_pose(body, seed, lead=(2, 3)):
    g = torch.Generator().manual_seed(seed)
    return (0.5 * torch.randn(*lead[:-1], body.num_betas, generator=g),
            0.5 * torch.randn(*lead, 3, generator=g), 0.3 * torch.randn(*lead, 69, generator=g),
            torch.randn(*lead, 3, generator=g))


def _min_pairwise(points) -> float:
    d = torch.cdist(torch.as_tensor(points), torch.as_tensor(points))
    return float(d.fill_diagonal_(float("inf")).min())


def test_samples_are_valid_barycentrics(samples, rest):
    assert isinstance(samples, SurfaceSamples) and samples.num_points == N
    assert samples.face_index.dtype == torch.long and samples.barycentric.shape == (N, 3)
    assert samples.barycentric.dtype == torch.float32
    assert (samples.barycentric >= 0).all()
    torch.testing.assert_close(samples.barycentric.sum(-1), torch.ones(N))
    assert samples.face_index.min() >= 0 and samples.face_index.max() < len(rest[1])


def test_deterministic_per_seed(body, samples):
    again = sample_surface(body.smpl.v_template, body.faces, N, seed=0)
    other = sample_surface(body.smpl.v_template, body.faces, N, seed=1)
    assert torch.equal(again.face_index, samples.face_index)
    assert torch.equal(again.barycentric, samples.barycentric)
    assert (other.face_index != samples.face_index).float().mean() > 0.5


def test_points_lie_on_their_triangles(samples, rest):
    verts, faces = rest
    tri = verts[faces[samples.face_index.numpy()]]  # (N, 3, 3)
    pts = BodySurface(faces, samples)(torch.as_tensor(verts)).numpy()
    e1, e2, rel = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], pts - tri[:, 0]
    n = np.cross(e1, e2)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    assert np.abs((rel * n).sum(-1)).max() < 1e-5  # on the face plane
    # barycentrics recovered from the 3D point by least squares: inside the triangle, equal to the stored ones
    A = np.stack([e1, e2], axis=-1)  # (N, 3, 2)
    uv = np.stack([np.linalg.lstsq(a, r, rcond=None)[0] for a, r in zip(A, rel)])  # (N, 2)
    recovered = np.concatenate([1 - uv.sum(-1, keepdims=True), uv], axis=-1)
    assert recovered.min() > -1e-5
    np.testing.assert_allclose(recovered, samples.barycentric.numpy(), atol=1e-4)


def test_fps_spreads_points_evenly(samples, rest):
    verts, faces = rest
    fps = BodySurface(faces, samples)(torch.as_tensor(verts))
    rng = np.random.default_rng(0)
    face, bary = _random_area_samples(rng, _face_areas(verts, faces), np.arange(len(faces)), N)
    iid = np.einsum("mk,mkc->mc", bary, verts[faces[face]])
    assert _min_pairwise(fps) >= 2 * _min_pairwise(iid)


def test_every_part_gets_its_quota(body, parts):
    quota = 14
    fparts = face_part_ids(body.faces.numpy(), parts)
    free = sample_surface(body.smpl.v_template, body.faces, 256, seed=0)
    assert np.bincount(fparts[free.face_index.numpy()], minlength=len(PART_NAMES)).min() < quota  # binds
    s = sample_surface(body.smpl.v_template, body.faces, 256, seed=0, part_ids=parts, min_per_part=quota)
    counts = np.bincount(fparts[s.face_index.numpy()], minlength=len(PART_NAMES))
    assert s.num_points == 256 and len(set(s.face_index.tolist())) > 200
    assert counts[np.unique(fparts)].min() >= quota
    with pytest.raises(ValueError):
        sample_surface(body.smpl.v_template, body.faces, 20, part_ids=parts, min_per_part=quota)


def test_posed_points_follow_the_barycentric_formula(body, samples):
    surface = BodySurface(body.faces, samples)
    verts, _ = body(*_random_pose(body, 1))  # (2, 3, V, 3)
    pts = surface(verts)
    v = verts.double().numpy()
    f, w = body.faces.numpy()[samples.face_index.numpy()], samples.barycentric.double().numpy()
    expected = sum(w[:, j, None] * v[..., f[:, j], :] for j in range(3))  # (2, 3, N, 3)
    np.testing.assert_allclose(pts.numpy(), expected, atol=1e-5)


def test_rigid_motion_is_equivariant(body, samples):
    surface = BodySurface(body.faces, samples)
    # float64: the cross products of small faces lose digits to cancellation in float32
    verts = body(*_random_pose(body, 2))[0].double()
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    q = q * torch.linalg.det(q).sign()  # a proper rotation
    t = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    moved = verts @ q.T + t
    torch.testing.assert_close(surface(moved), surface(verts) @ q.T + t)
    torch.testing.assert_close(surface.normals(moved), surface.normals(verts) @ q.T)


def test_any_leading_dims(body, samples):
    surface = BodySurface(body.faces, samples)
    verts = torch.randn(2, 3, 4, body.num_verts, 3)
    assert surface(verts).shape == (2, 3, 4, N, 3)
    assert surface.normals(verts).shape == (2, 3, 4, N, 3)
    torch.testing.assert_close(surface(verts)[1, 2, 3], surface(verts[1, 2, 3]))


def test_normals_are_unit_and_outward(body, samples, parts):
    surface = BodySurface(body.faces, samples)
    v = body.smpl.v_template
    pts, nrm = surface(v), surface.normals(v)
    torch.testing.assert_close(nrm.norm(dim=-1), torch.ones(N))
    # the body centroid sits outside thin limbs (inner arm normals face it), so use each point's part centroid
    pid = torch.as_tensor(parts)
    centroids = torch.stack([v[pid == k].mean(0) if (pid == k).any() else v.mean(0)
                             for k in range(len(PART_NAMES))])
    own = centroids[torch.as_tensor(face_part_ids(body.faces.numpy(), parts))[samples.face_index]]
    assert ((nrm * (pts - own)).sum(-1) > 0).float().mean() > 0.9


def test_from_body_model_and_pose_points(body, samples):
    surface = BodySurface.from_body_model(body, N, seed=0)
    assert torch.equal(surface.face_index, samples.face_index) and surface.num_points == N
    assert set(surface.state_dict()) == {"face_index", "barycentric"}  # faces (SMPL data) never checkpointed
    pose = _random_pose(body, 4, lead=(2, 5))
    pts = pose_points(body, surface, *pose)
    assert pts.shape == (2, 5, N, 3)
    torch.testing.assert_close(pts, surface(body(*pose)[0]))
    # zero pose, zero shape, no translation: the points are the rest-template samples
    rest = pose_points(body, surface, torch.zeros(1, 10), torch.zeros(1, 1, 3), torch.zeros(1, 1, 69))
    torch.testing.assert_close(rest[0, 0], surface(body.smpl.v_template), atol=1e-5, rtol=1e-5)
