"""The pure-PyTorch id/depth rasteriser (`isa4d.render.TorchRenderer`) against hand-computed cases and, where this
machine has headless EGL, against `MeshRenderer` on posed toy SMPL bodies that occlude each other."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import isa4d.render.torch_raster as torch_raster
from isa4d.metrics.body_maps import render_body_maps
from isa4d.render import Mesh, MeshRenderer, RenderError, TorchRenderer, make_renderer

try:
    MeshRenderer(8, 8).close()
    EGL_ERROR = None
except RenderError as _e:  # pragma: no cover - environment dependent
    EGL_ERROR = str(_e)
needs_egl = pytest.mark.skipif(EGL_ERROR is not None, reason=f"headless OpenGL (EGL) unavailable: {EGL_ERROR}")


def _look_at(eye, target) -> np.ndarray:
    """OpenCV w2c (x right, y down, z forward) at `eye` looking at `target`, world y up."""
    eye, target = np.asarray(eye, float), np.asarray(target, float)
    f = (target - eye) / np.linalg.norm(target - eye)
    r = np.cross(f, (0.0, -1.0, 0.0))
    r /= np.linalg.norm(r)
    R = np.stack([r, np.cross(f, r), f])
    w2c = np.eye(4)
    w2c[:3, :3], w2c[:3, 3] = R, -R @ eye
    return w2c


# (height, width, K, w2c): square and landscape, off-centre principal point, fx != fy, skew, a close camera
CAMERAS = {
    "front64": (64, 64, np.array([[70.0, 0, 31.5], [0, 70.0, 31.5], [0, 0, 1]]),
                _look_at((0.1, -0.2, 3.2), (0, -0.3, 0))),
    "oblique96x128": (96, 128, np.array([[105.0, 0.7, 70.3], [0, 98.0, 41.7], [0, 0, 1]]),
                      _look_at((2.2, 0.6, 2.0), (0, -0.35, 0))),
    "close128": (128, 128, np.array([[140.0, 0, 63.5], [0, 140.0, 63.5], [0, 0, 1]]),
                 _look_at((-0.8, -0.1, 1.6), (0, -0.3, 0))),
}


@pytest.fixture(scope="module")
def people(toy_body_dir):
    """Three posed toy bodies standing close one behind the other, two frames: vertices (3, 2, V, 3), faces, parts."""
    from isa4d.body import BodyModel

    body = BodyModel(toy_body_dir)
    pose = torch.randn(3, 2, 69, generator=torch.Generator().manual_seed(0)) * 0.25
    orient = torch.zeros(3, 2, 3)
    orient[..., 1] = torch.tensor([[0.3], [-0.8], [2.5]]) + torch.tensor([0.0, 0.4])
    transl = torch.tensor([[-0.35, 0.0, 0.0], [0.25, 0.05, 0.6], [0.05, -0.05, -0.7]])[:, None].expand(3, 2, 3)
    verts, _ = body(torch.zeros(3, 10), orient, pose, transl)
    return verts, body.faces, body.part_ids


def _meshes(people, t=0) -> list[Mesh]:
    verts, faces, parts = people
    return [Mesh(vertices=verts[p, t].numpy(), faces=faces.numpy(), part_ids=parts.numpy(), instance_id=p + 1)
            for p in range(len(verts))]


def _agreement(a, b) -> dict[str, float]:
    """Silhouette IoU, and part / instance agreement on the pixels both cover, of two render outputs."""
    sa, sb = a.part > 0, b.part > 0
    both = sa & sb
    return {"iou": (sa & sb).sum() / max((sa | sb).sum(), 1), "part": (a.part[both] == b.part[both]).mean(),
            "instance": (a.instance[both] == b.instance[both]).mean()}


def _pixel_quad(u0, u1, v0, v1, K, z=2.0, diagonal=0) -> Mesh:
    """A fronto-parallel square at depth z whose corners project exactly to pixel coordinates (u, v)."""
    Kinv = np.linalg.inv(K)
    corners = [(u0, v0), (u1, v0), (u1, v1), (u0, v1)]
    V = np.array([z * Kinv @ (u, v, 1.0) for u, v in corners])
    F = np.array([[0, 1, 2], [0, 2, 3]]) if diagonal == 0 else np.array([[0, 1, 3], [1, 2, 3]])
    return Mesh(vertices=V, faces=F, part_ids=np.array([0, 1, 2, 3]), instance_id=1)


K10 = np.array([[10.0, 0, 4.5], [0, 10.0, 4.5], [0, 0, 1]])


# ------------------------------------------------------------------------------------------- against EGL

@needs_egl
@pytest.mark.parametrize("camera", sorted(CAMERAS))
def test_matches_egl_on_occluding_bodies(people, camera):
    H, W, K, w2c = CAMERAS[camera]
    meshes = _meshes(people)
    with MeshRenderer(H, W) as gl, TorchRenderer(H, W) as tr:
        a, b = gl.render(meshes, K, w2c, with_normal=False), tr.render(meshes, K, w2c)
        alone = [tr.render([m], K, w2c).part > 0 for m in meshes]
    assert b.part.dtype == b.instance.dtype == np.int16 and b.depth.dtype == np.float32
    assert b.part.shape == b.instance.shape == b.depth.shape == (H, W)
    visible = [(b.instance == p + 1).sum() for p in range(3)]
    assert sum(s.sum() for s in alone) > sum(visible) and min(visible) > 0  # the people occlude each other
    agree = _agreement(a, b)
    assert agree["iou"] >= 0.99 and agree["part"] >= 0.98 and agree["instance"] >= 0.98, agree
    same = (a.part > 0) & (a.part == b.part) & (a.instance == b.instance)
    rel = np.abs(a.depth[same] - b.depth[same]) / a.depth[same]
    assert np.median(rel) < 1e-4 and rel.max() < 2e-3  # GL interpolates z in float32, we in float64
    assert np.isinf(b.depth[b.part == 0]).all()


@needs_egl
def test_fill_rule_matches_egl_on_pixel_aligned_edges():
    """Edges through pixel centres: left and top edges are in, right and bottom out, shared edges drawn once."""
    tri = [[(1, 1), (7, 1), (1, 7)], [(7, 7), (7, 1), (1, 7)], [(1.5, 1), (7, 4), (2, 8)]]
    meshes = [[_pixel_quad(2, 5, 2, 5, K10, diagonal=d)] for d in (0, 1)]
    meshes += [[Mesh(vertices=np.array([2.0 * np.linalg.inv(K10) @ (u, v, 1.0) for u, v in t]),
                     faces=np.array([[0, 1, 2]]), part_ids=np.zeros(3, int))] for t in tri]
    with MeshRenderer(10, 10) as gl, TorchRenderer(10, 10) as tr:
        for m in meshes:
            np.testing.assert_array_equal(tr.render(m, K10, np.eye(4)).part, gl.render(m, K10, np.eye(4)).part)


@needs_egl
@pytest.mark.parametrize("eye, target", [((0.0, -0.3, 0.12), (0, -0.3, 3)), ((0.3, 0.0, 0.5), (0, -0.2, 0)),
                                         ((0, -0.5, 4), (0, 0.5, 0))])
def test_near_plane_clipping_matches_egl(people, eye, target):
    """Cameras inside / against the bodies and a ground plane reaching behind the camera: faces crossing the near
    plane are cut there per pixel, like GL's clipping."""
    ground = Mesh(vertices=np.array([[-50, 1.2, -50], [50, 1.2, -50], [50, 1.2, 50], [-50, 1.2, 50.0]]),
                  faces=np.array([[0, 1, 2], [0, 2, 3]]), part_ids=np.full(4, 30), instance_id=9)
    meshes = _meshes(people) + [ground]
    K, w2c = np.array([[80.0, 0, 63.5], [0, 80.0, 47.5], [0, 0, 1]]), _look_at(eye, target)
    verts = np.concatenate([m.vertices for m in meshes]) @ w2c[:3, :3].T + w2c[:3, 3]
    offsets = np.cumsum([0] + [len(m.vertices) for m in meshes])[:-1]
    z = verts[np.concatenate([m.faces + o for m, o in zip(meshes, offsets)])][..., 2]
    assert ((z < 0.05).any(1) & (z >= 0.05).any(1)).any()  # some faces do cross the near plane
    with MeshRenderer(96, 128) as gl, TorchRenderer(96, 128) as tr:
        agree = _agreement(gl.render(meshes, K, w2c, with_normal=False), tr.render(meshes, K, w2c))
    assert agree["iou"] >= 0.99 and agree["part"] >= 0.98 and agree["instance"] >= 0.98, agree


@needs_egl
def test_render_body_maps_through_either_backend(people):
    verts, faces, parts = people
    H, W, K, w2c = CAMERAS["oblique96x128"]
    Ks, w2cs = torch.from_numpy(K).expand(2, 2, 3, 3), torch.from_numpy(w2c).expand(2, 2, 4, 4)
    mask = torch.tensor([[True, True, True], [True, False, True]])
    vertices = verts.expand(2, *verts.shape)  # (B, P, T, V, 3)
    with make_renderer(H, W, backend="egl") as gl, make_renderer(H, W, backend="torch", device="cpu") as tr:
        sil_gl, parts_gl = render_body_maps(gl, vertices, faces, parts, Ks, w2cs, mask)
        sil_tr, parts_tr = render_body_maps(tr, vertices, faces, parts, Ks, w2cs, mask)
    assert isinstance(tr, TorchRenderer) and isinstance(gl, MeshRenderer)
    assert sil_tr.shape == (2, 2, H, W) and parts_tr.dtype == torch.long
    iou = (sil_gl & sil_tr).sum() / (sil_gl | sil_tr).sum()
    both = sil_gl & sil_tr
    assert iou >= 0.99 and (parts_gl[both] == parts_tr[both]).float().mean() >= 0.98
    assert not torch.equal(sil_tr[0], sil_tr[1])  # the masked-out person is missing from the second clip


# ------------------------------------------------------------------------------------------- torch only

def test_fill_rule_and_depth_by_hand():
    """A pixel-aligned square covers columns and rows [2, 5) (left / top edges in); a fronto-parallel face has
    its depth everywhere and a tilted one 1/z affine in the pixel coordinates."""
    with TorchRenderer(10, 10) as tr:
        out = tr.render([_pixel_quad(2, 5, 2, 5, K10, z=2.0)], K10, np.eye(4))
        expected = np.zeros((10, 10), bool)
        expected[2:5, 2:5] = True
        np.testing.assert_array_equal(out.part > 0, expected)
        np.testing.assert_array_equal(out.instance, expected.astype(np.int16))
        np.testing.assert_allclose(out.depth[expected], 2.0, rtol=1e-6)
        assert np.isinf(out.depth[~expected]).all()
        # plane z = 2 + 0.1 x (camera space) through the whole view: 1/z = (1 - 0.1 (u - cx)/fx) / 2
        V = np.array([[-5, -5, 1.5], [5, -5, 2.5], [5, 5, 2.5], [-5, 5, 1.5]])
        out = tr.render([Mesh(vertices=V, faces=np.array([[0, 1, 2], [0, 2, 3]]))], K10, np.eye(4))
    u = np.arange(10)[None].repeat(10, 0)
    np.testing.assert_allclose(out.depth, 2.0 / (1 - 0.1 * (u - 4.5) / 10.0), rtol=2e-5)  # corners snapped
    assert (out.part == 0).all() and (out.instance == 1).all()  # no part ids: part 0, the mesh still counts


def test_occlusion_and_depth_ties():
    """The nearer face wins whatever the order; at equal depth the first drawn does (GL_LESS)."""
    near, far = (_pixel_quad(1, 8, 1, 8, K10, z=z) for z in (2.0, 3.0))
    near.instance_id, far.instance_id = 1, 2
    twin = _pixel_quad(1, 8, 1, 8, K10, z=2.0)
    twin.instance_id = 3
    with TorchRenderer(10, 10) as tr:
        for order in ([near, far], [far, near]):
            assert set(np.unique(tr.render(order, K10, np.eye(4)).instance)) == {0, 1}
        assert set(np.unique(tr.render([near, twin], K10, np.eye(4)).instance)) == {0, 1}
        assert set(np.unique(tr.render([twin, near], K10, np.eye(4)).instance)) == {0, 3}


def test_faces_behind_the_camera_and_beyond_far_are_ignored(people):
    H, W, K, w2c = CAMERAS["front64"]
    behind = w2c.copy()
    behind[:3] *= np.array([[-1.0], [1.0], [-1.0]])  # turned around: x and z flipped, everything at z < 0
    with TorchRenderer(H, W) as tr, TorchRenderer(H, W, far=1.0) as short:
        assert (tr.render(_meshes(people), K, w2c).part > 0).any()
        for out in (tr.render(_meshes(people), K, behind), short.render(_meshes(people), K, w2c)):
            assert (out.part == 0).all() and (out.instance == 0).all() and np.isinf(out.depth).all()


def test_face_crossing_the_camera_plane_is_cut_not_mirrored():
    """One corner in front, two behind the camera: what shows is the part at z >= near, which projects upwards
    from the front corner (a naive projection would mirror the corners behind and draw downwards). Reference:
    per-pixel ray / triangle intersection (Moller-Trumbore) with the hit at z >= near."""
    V = np.array([[0.1, 0.05, 2.0], [-1.3, -0.9, -1.0], [1.1, -1.2, -0.5]])
    K = np.array([[10.0, 0, 9.5], [0, 10.0, 9.5], [0, 0, 1]])
    with TorchRenderer(20, 20) as tr:
        out = tr.render([Mesh(vertices=V, faces=np.array([[0, 1, 2]]))], K, np.eye(4))
    v, u = np.mgrid[0:20, 0:20].astype(float)
    ray = np.stack([(u - 9.5) / 10, (v - 9.5) / 10, np.ones_like(u)], -1)  # (20, 20, 3), z = 1
    e1, e2 = V[1] - V[0], V[2] - V[0]
    p = np.cross(ray, e2)
    det = p @ e1
    s = -V[0]
    b1 = (p @ s) / det
    qv = np.cross(s, e1)
    b2 = (qv @ ray.reshape(-1, 3).T).reshape(20, 20) / det
    depth = (qv @ e2) / det  # ray parameter = camera z, since the ray's z component is 1
    expected = (b1 >= 0) & (b2 >= 0) & (b1 + b2 <= 1) & (depth >= 0.05)
    assert expected[:9].any() and not expected[11:].any()
    np.testing.assert_array_equal(out.instance == 1, expected)
    np.testing.assert_allclose(out.depth[expected], depth[expected], rtol=1e-5)


def test_empty_scenes():
    with TorchRenderer(12, 16) as tr:
        for meshes in ([], [Mesh(vertices=np.zeros((0, 3)), faces=np.zeros((0, 3), int))]):
            out = tr.render(meshes, K10, np.eye(4))
            assert out.part.shape == (12, 16) and not out.part.any() and not out.instance.any()
            assert np.isinf(out.depth).all() and out.rgb is None and out.normal is None


def test_chunking_does_not_change_the_result(people):
    H, W, K, w2c = CAMERAS["close128"]
    with TorchRenderer(H, W) as whole, TorchRenderer(H, W, max_pairs=997) as chunked:
        a, b = whole.render(_meshes(people), K, w2c), chunked.render(_meshes(people), K, w2c)
    np.testing.assert_array_equal(a.part, b.part)
    np.testing.assert_array_equal(a.instance, b.instance)
    np.testing.assert_array_equal(a.depth, b.depth)


def test_inputs_checked_and_closed():
    tri = Mesh(vertices=np.eye(3) + [0, 0, 2], faces=np.array([[0, 1, 2]]))
    tr = TorchRenderer(8, 8)
    tr.render([tri], K10, np.eye(4), background=np.zeros((8, 8, 3), np.uint8), ambient=0.5)  # shading ignored
    with pytest.raises(TypeError, match="unexpected"):
        tr.render([tri], K10, np.eye(4), backgrund=None)
    with pytest.raises(ValueError, match="normals"):
        tr.render([tri], K10, np.eye(4), with_normal=True)
    with pytest.raises(ValueError, match="out of range"):
        tr.render([Mesh(vertices=np.eye(3), faces=np.array([[0, 1, 3]]))], K10, np.eye(4))
    with pytest.raises(ValueError, match="K must be"):
        tr.render([tri], np.eye(4), np.eye(4))
    tr.close()
    with pytest.raises(RenderError, match="closed"):
        tr.render([tri], K10, np.eye(4))


def test_make_renderer_backends(monkeypatch):
    with make_renderer(8, 8, backend="torch", device="cpu") as r:
        assert isinstance(r, TorchRenderer) and r.device == torch.device("cpu")
    with pytest.raises(ValueError, match="backend"):
        make_renderer(8, 8, backend="vulkan")

    def no_egl(*args, **kwargs):
        raise RenderError("headless OpenGL (EGL) is not available: test")

    monkeypatch.setattr(torch_raster, "MeshRenderer", no_egl)
    monkeypatch.setattr(torch_raster, "_warned_fallback", False)
    with pytest.warns(UserWarning, match="TorchRenderer"):
        r = make_renderer(8, 8, device="cpu")
    assert isinstance(r, TorchRenderer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(make_renderer(8, 8, device="cpu"), TorchRenderer)  # warned once
    with pytest.raises(RenderError, match="test"):
        make_renderer(8, 8, backend="egl")


@pytest.mark.gpu
def test_cuda_matches_cpu(people):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for H, W, K, w2c in CAMERAS.values():
        with TorchRenderer(H, W, device="cpu") as cpu, TorchRenderer(H, W, device="cuda") as gpu:
            a, b = cpu.render(_meshes(people), K, w2c), gpu.render(_meshes(people), K, w2c)
        np.testing.assert_array_equal(a.part, b.part)
        np.testing.assert_array_equal(a.instance, b.instance)
        np.testing.assert_allclose(a.depth, b.depth, rtol=1e-6)


def test_evaluation_falls_back_to_torch_without_egl(monkeypatch):
    from isa4d.training.evaluation import VideoEvaluation

    def no_egl(*args, **kwargs):
        raise RenderError("headless OpenGL (EGL) is not available: test")

    monkeypatch.setattr(torch_raster, "MeshRenderer", no_egl)
    monkeypatch.setattr(torch_raster, "_warned_fallback", True)  # the warning itself is tested above
    evaluation = VideoEvaluation(metrics=("pose_iou",)).build()
    assert isinstance(evaluation._renderer(16, 24), TorchRenderer)
    evaluation.close()
