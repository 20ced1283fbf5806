"""Tests for isa4d.render: headless moderngl rasterisation with OpenCV cameras."""

from __future__ import annotations

import numpy as np
import pytest

from isa4d.render import Mesh, MeshRenderer, RenderError, projection_from_K

try:
    _probe = MeshRenderer(8, 8)
    _probe.close()
except RenderError as _e:  # pragma: no cover - environment dependent
    pytest.skip(f"headless OpenGL (EGL) unavailable: {_e}", allow_module_level=True)

H, W = 96, 128


@pytest.fixture(scope="module")
def renderer():
    with MeshRenderer(H, W) as r:
        yield r


def _rot(axis, deg):
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    R = np.eye(3)
    R[i, i], R[i, j], R[j, i], R[j, j] = c, -s, s, c
    return R


def _camera():
    """Non-centred principal point, fx != fy, rotated and translated camera."""
    K = np.array([[110.0, 0.0, 70.3], [0.0, 95.0, 41.7], [0.0, 0.0, 1.0]])
    w2c = np.eye(4)
    w2c[:3, :3] = _rot(0, 12.0) @ _rot(1, -25.0) @ _rot(2, 7.0)
    w2c[:3, 3] = [0.2, -0.1, 3.0]
    return K, w2c


def _to_world(p_cam, w2c):
    c2w = np.linalg.inv(w2c)
    return p_cam @ c2w[:3, :3].T + c2w[:3, 3]


def _project(X, K, w2c):
    pc = X @ w2c[:3, :3].T + w2c[:3, 3]
    uv = pc @ K.T
    return uv[:, :2] / uv[:, 2:], pc[:, 2]


def _reference_mask(verts, faces, K, w2c, h=H, w=W):
    """Numpy rasterisation: pixel centres (i, j) inside any projected triangle (barycentric test)."""
    uv, _ = _project(verts, K, w2c)
    jj, ii = np.mgrid[0:h, 0:w].astype(np.float64)
    mask = np.zeros((h, w), bool)
    for a, b, c in uv[faces]:
        area = (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
        if abs(area) < 1e-12:
            continue
        l0 = ((b[0] - ii) * (c[1] - jj) - (b[1] - jj) * (c[0] - ii)) / area
        l1 = ((c[0] - ii) * (a[1] - jj) - (c[1] - jj) * (a[0] - ii)) / area
        mask |= (l0 >= 0) & (l1 >= 0) & (1 - l0 - l1 >= 0)
    return mask


def _near_boundary(mask):
    """Pixels with an 8-neighbour of the other label."""
    p = np.pad(mask, 1, mode="edge")
    out = np.zeros_like(mask)
    for dj in (-1, 0, 1):
        for di in (-1, 0, 1):
            out |= p[1 + dj:1 + dj + mask.shape[0], 1 + di:1 + di + mask.shape[1]] != mask
    return out


def _blob_mesh(center_cam, radius, w2c, n=12, seed=0):
    """A bumpy star-shaped fan of triangles around a camera-space centre, in world coordinates."""
    rng = np.random.default_rng(seed)
    ang = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = radius * rng.uniform(0.6, 1.0, n)
    ring = np.stack([r * np.cos(ang), r * np.sin(ang), rng.uniform(-0.2, 0.2, n) * radius], 1)
    verts_cam = np.concatenate([[[0.0, 0.0, 0.0]], ring]) + center_cam
    faces = np.array([[0, 1 + k, 1 + (k + 1) % n] for k in range(n)])
    return _to_world(verts_cam, w2c), faces


def _disk(center_cam, radius, w2c, n=48):
    """Fronto-parallel polygonal disk in camera space -> world vertices, faces."""
    ang = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ring = np.stack([radius * np.cos(ang), radius * np.sin(ang), np.zeros(n)], 1)
    verts_cam = np.concatenate([[[0.0, 0.0, 0.0]], ring]) + center_cam
    faces = np.array([[0, 1 + k, 1 + (k + 1) % n] for k in range(n)])
    return _to_world(verts_cam, w2c), faces


def _quad(x0, x1, y0, y1, z, w2c=np.eye(4)):
    v = np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]], dtype=np.float64)
    return _to_world(v, w2c), np.array([[0, 1, 2], [0, 2, 3]])


def _uv_sphere(center, radius, n_lat=24, n_lon=48):
    th = np.linspace(0, np.pi, n_lat + 1)
    ph = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    T, P = np.meshgrid(th, ph, indexing="ij")
    v = np.stack([np.sin(T) * np.cos(P), np.cos(T), np.sin(T) * np.sin(P)], -1).reshape(-1, 3) * radius + center
    idx = np.arange((n_lat + 1) * n_lon).reshape(n_lat + 1, n_lon)
    a, b = idx[:-1], np.roll(idx[:-1], -1, axis=1)
    c, d = idx[1:], np.roll(idx[1:], -1, axis=1)
    faces = np.concatenate([np.stack([a, c, b], -1).reshape(-1, 3), np.stack([b, c, d], -1).reshape(-1, 3)])
    return v, faces


def test_projection_matrix_maps_pixel_centres():
    K, _ = _camera()
    P = projection_from_K(K, H, W, 0.05, 100.0)
    pc = np.array([[0.3, -0.2, 2.5, 1.0]])
    clip = pc @ P.T
    ndc = clip[0, :3] / clip[0, 3]
    u, v = K[0, 0] * 0.3 / 2.5 + K[0, 2], K[1, 1] * -0.2 / 2.5 + K[1, 2]
    # window coordinate = pixel + 0.5 (pixel centres at integers), no y flip (row 0 = top)
    np.testing.assert_allclose((ndc[0] + 1) * W / 2, u + 0.5, atol=1e-9)
    np.testing.assert_allclose((ndc[1] + 1) * H / 2, v + 0.5, atol=1e-9)
    for z, want in ((0.05, -1.0), (100.0, 1.0)):
        c = P @ np.array([0.0, 0.0, z, 1.0])
        np.testing.assert_allclose(c[2] / c[3], want, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_projection_agrees_with_numpy_reference(renderer, seed):
    K, w2c = _camera()
    if seed == 0:
        w2c = np.eye(4)
    rng = np.random.default_rng(seed)
    center = np.array([rng.uniform(-0.4, 0.4), rng.uniform(-0.3, 0.3), rng.uniform(2.0, 3.0)])
    verts, faces = _blob_mesh(center, 0.7, w2c, n=14, seed=seed)
    out = renderer.render([Mesh(vertices=verts, faces=faces, instance_id=3)], K, w2c)
    got, ref = out.instance > 0, _reference_mask(verts, faces, K, w2c)
    assert ref.sum() > 500
    assert set(np.unique(out.instance)) <= {0, 3}
    iou = (got & ref).sum() / (got | ref).sum()
    assert iou > 0.98, iou
    disagree = got != ref
    assert not (disagree & ~_near_boundary(ref)).any(), "disagreement farther than 1 px from the boundary"


def test_vertex_projection_centroid(renderer):
    K, w2c = _camera()
    rng = np.random.default_rng(5)
    # six non-overlapping blobs on a 3x2 grid of directions, jittered, at random depths
    dirs = np.array([[x, y] for y in (-0.2, 0.15) for x in (-0.4, 0.0, 0.4)]) + rng.uniform(-0.05, 0.05, (6, 2))
    z = rng.uniform(2.0, 4.0, 6)
    pts_cam = np.concatenate([dirs * z[:, None], z[:, None]], 1)
    meshes = []
    for k, p in enumerate(pts_cam):
        radius = 5.0 * p[2] / K[0, 0]  # about 5 px
        v, f = _disk(p, radius, w2c)
        meshes.append(Mesh(vertices=v, faces=f, instance_id=k + 1))
    out = renderer.render(meshes, K, w2c)
    uv, _ = _project(_to_world(pts_cam, w2c), K, w2c)
    for k in range(len(pts_cam)):
        jj, ii = np.nonzero(out.instance == k + 1)
        assert len(ii) > 40
        np.testing.assert_allclose([ii.mean(), jj.mean()], uv[k], atol=0.25)


def test_depth_fronto_parallel_and_tilted(renderer):
    K, w2c = _camera()
    v, f = _quad(-3, 3, -3, 3, 2.5, w2c)
    out = renderer.render([Mesh(vertices=v, faces=f)], K, w2c)
    assert (out.instance > 0).all()
    np.testing.assert_allclose(out.depth, 2.5, rtol=1e-3)

    # tilted plane n . X = d in camera space; along the ray X = z K^-1 (i, j, 1): z = d / (n . K^-1 (i, j, 1))
    n = np.array([0.3, -0.4, -1.0])
    n /= np.linalg.norm(n)
    d = -3.0
    e1 = np.cross(n, [0, 1, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(n, e1)
    c = n * d
    corners = np.array([c + s * 4.0 * e1 + t * 4.0 * e2 for s, t in ((-1, -1), (1, -1), (1, 1), (-1, 1))])
    out = renderer.render([Mesh(vertices=_to_world(corners, w2c), faces=np.array([[0, 1, 2], [0, 2, 3]]))], K, w2c)
    jj, ii = np.mgrid[0:H, 0:W].astype(np.float64)
    rays = np.stack([ii, jj, np.ones_like(ii)], -1) @ np.linalg.inv(K).T
    z_ref = d / (rays @ n)
    cov = out.instance > 0
    assert cov.mean() > 0.9
    np.testing.assert_allclose(out.depth[cov], z_ref[cov], rtol=1e-3)
    assert np.isinf(out.depth[~cov]).all()
    np.testing.assert_allclose(np.linalg.norm(out.normal[cov], axis=-1), 1.0, atol=1e-4)
    np.testing.assert_allclose(out.normal[cov], np.broadcast_to(n, out.normal[cov].shape), atol=1e-3)


def test_occlusion_order_independent_and_parts(renderer):
    K, w2c = _camera()
    vn, fn = _quad(-0.6, 0.6, -0.4, 0.4, 2.0, w2c)
    vf, ff = _quad(-0.2, 1.0, -0.6, 0.6, 3.0, w2c)
    part_near = np.array([0, 5, 5, 0])  # flat: face (0,1,2) -> part 0, face (1,2,3) -> part 5
    near = Mesh(vertices=vn, faces=np.array([[0, 1, 2], [1, 2, 3]]), part_ids=part_near, instance_id=1,
                face_colors=np.array([[1, 0, 0], [0, 1, 0.0]]))
    far = Mesh(vertices=vf, faces=ff, part_ids=np.full(4, 9), instance_id=2, colors=np.full((4, 3), 0.5))
    a = renderer.render([near, far], K, w2c)
    b = renderer.render([far, near], K, w2c)
    for o in (a, b):
        m_near = _reference_mask(vn, near.faces, K, w2c)
        m_far = _reference_mask(vf, ff, K, w2c)
        inner = ~_near_boundary(m_near) & ~_near_boundary(m_far)
        both = m_near & m_far & inner
        assert both.sum() > 100
        assert (o.instance[both] == 1).all()
        assert (o.instance[m_far & ~m_near & inner] == 2).all()
        assert (o.part[m_far & ~m_near & inner] == 10).all()
        assert set(np.unique(o.part[m_near & inner])) == {1, 6}
        np.testing.assert_allclose(o.depth[m_near & inner], 2.0, rtol=1e-3)
    for name in ("instance", "part", "depth", "rgb"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


@pytest.mark.parametrize("samples", [0, 4])
def test_background_composite_exact(samples):
    K, w2c = _camera()
    bg = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    v, f = _blob_mesh(np.array([0.0, 0.0, 2.5]), 0.6, w2c)
    with MeshRenderer(H, W, samples=samples) as r:
        out = r.render([Mesh(vertices=v, faces=f, colors=np.ones((len(v), 3)))], K, w2c, background=bg)
        out_black = r.render([Mesh(vertices=v, faces=f)], K, w2c)
    cov = out.instance > 0
    assert 200 < cov.sum() < cov.size - 200
    far_from = ~cov & ~_near_boundary(cov)  # MSAA may blend one pixel outside the centre-sampled mask
    np.testing.assert_array_equal(out.rgb[far_from], bg[far_from])
    assert (out_black.rgb[far_from] == 0).all()
    if samples == 0:
        np.testing.assert_array_equal(out.rgb[~cov], bg[~cov])
    assert (out.rgb[cov & ~_near_boundary(cov)] > 0).all()


def test_shading_sphere_and_two_sided(renderer):
    K = np.array([[100.0, 0.0, (W - 1) / 2], [0.0, 100.0, (H - 1) / 2], [0.0, 0.0, 1.0]])
    v, f = _uv_sphere(np.array([0.0, 0.0, 4.0]), 1.0)
    kw = dict(light_dir_cam=(0.0, 0.0, -1.0), ambient=0.2)
    out = renderer.render([Mesh(vertices=v, faces=f)], K, np.eye(4), **kw)
    cov = out.instance > 0
    centre = out.rgb[H // 2, W // 2].astype(int)
    assert abs(centre[0] - 0.7 * 255) <= 2  # facing the light: full albedo
    rim = cov & _near_boundary(cov)
    assert rim.sum() > 50
    assert out.rgb[rim][:, 0].mean() < centre[0] - 40
    flipped = renderer.render([Mesh(vertices=v, faces=f[:, ::-1])], K, np.eye(4), **kw)
    assert np.abs(flipped.rgb.astype(int) - out.rgb.astype(int)).max() <= 1
    assert (flipped.normal[cov][:, 2] < 0).all()


def test_texture_uv_convention(renderer):
    K = np.array([[100.0, 0.0, (W - 1) / 2], [0.0, 100.0, (H - 1) / 2], [0.0, 0.0, 1.0]])
    tex = np.zeros((64, 64, 3), np.uint8)
    tex[:32, :32] = (255, 0, 0)    # image top-left
    tex[:32, 32:] = (0, 255, 0)    # top-right
    tex[32:, :32] = (0, 0, 255)    # bottom-left
    tex[32:, 32:] = (255, 255, 0)  # bottom-right
    v, f = _quad(-1, 1, -1, 1, 2.0)  # camera y down: v[0] is the top-left corner in the image
    uv = np.array([[0, 1], [1, 1], [1, 0], [0, 0.0]])  # OBJ convention: v = 1 is the top of the image
    out = renderer.render([Mesh(vertices=v, faces=f, uv=uv, texture=tex)], K, np.eye(4),
                          light_dir_cam=(0, 0, -1), ambient=1.0)
    jc, ic = H // 2, W // 2
    assert tuple(out.rgb[jc - 20, ic - 20]) == (255, 0, 0)
    assert tuple(out.rgb[jc - 20, ic + 20]) == (0, 255, 0)
    assert tuple(out.rgb[jc + 20, ic - 20]) == (0, 0, 255)
    assert tuple(out.rgb[jc + 20, ic + 20]) == (255, 255, 0)


def test_bad_inputs(renderer):
    K, w2c = _camera()
    v, f = _quad(-1, 1, -1, 1, 2.0)
    with pytest.raises(ValueError):
        renderer.render([Mesh(vertices=v, faces=f, colors=np.ones((4, 3)), face_colors=np.ones((2, 3)))], K, w2c)
    with pytest.raises(ValueError):
        renderer.render([Mesh(vertices=v, faces=f)], K, w2c, background=np.zeros((H, W, 3), np.float32))


def test_clear_error_without_egl(monkeypatch):
    import moderngl

    def boom(**kwargs):
        raise Exception("eglGetDisplay failed")

    monkeypatch.setattr(moderngl, "create_standalone_context", boom)
    with pytest.raises(RenderError, match="headless OpenGL \\(EGL\\) is not available.*libegl1"):
        MeshRenderer(16, 16)
