"""Tests for isa4d.geometry.ndc and isa4d.geometry.plucker: hand-computed cases and geometric invariances."""

from __future__ import annotations

import math

import pytest
import torch

from isa4d.geometry.camera import camera_center, project
from isa4d.geometry.ndc import (
    depth_to_ndc, depth_to_unit, ndc_to_pixel, pixel_to_ndc, points_to_ndc, sinusoidal_embedding, token_grid_ndc,
)
from isa4d.geometry.plucker import latent_frame_groups, pixel_rays, plucker, plucker_latent

DT = torch.float64


def random_camera(gen: torch.Generator, batch: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """K with fx != fy, skew-free, off-centre principal point; rigid w2c with a random rotation and translation."""
    fx, fy, cx, cy = (torch.rand(batch, generator=gen, dtype=DT) * (hi - lo) + lo
                      for lo, hi in ((40, 200), (40, 200), (10, 50), (10, 50)))
    K = torch.zeros(*batch, 3, 3, dtype=DT)
    K[..., 0, 0], K[..., 1, 1], K[..., 0, 2], K[..., 1, 2], K[..., 2, 2] = fx, fy, cx, cy, 1.0
    q, r = torch.linalg.qr(torch.randn(*batch, 3, 3, generator=gen, dtype=DT))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]
    q = torch.where(torch.linalg.det(q)[..., None, None] < 0, -q, q)
    w2c = torch.eye(4, dtype=DT).expand(*batch, 4, 4).clone()
    w2c[..., :3, :3], w2c[..., :3, 3] = q, torch.randn(*batch, 3, generator=gen, dtype=DT)
    return K, w2c


# ----------------------------------------------------------------------------------------------------- ndc


def test_pixel_to_ndc_edges_centre_and_round_trip():
    H, W = 6, 10
    uv = torch.tensor([[-0.5, -0.5], [W - 0.5, H - 0.5], [(W - 1) / 2, (H - 1) / 2], [0.0, 0.0]], dtype=DT)
    ndc = pixel_to_ndc(uv, H, W)
    torch.testing.assert_close(ndc[0], torch.tensor([-1.0, -1.0], dtype=DT))
    torch.testing.assert_close(ndc[1], torch.tensor([1.0, 1.0], dtype=DT))
    torch.testing.assert_close(ndc[2], torch.tensor([0.0, 0.0], dtype=DT))
    torch.testing.assert_close(ndc[3], torch.tensor([1 / W - 1, 1 / H - 1], dtype=DT))
    uv_rand = torch.rand(4, 7, 2, dtype=DT) * 20 - 5
    torch.testing.assert_close(ndc_to_pixel(pixel_to_ndc(uv_rand, H, W), H, W), uv_rand)


def test_pixel_to_ndc_matches_grid_sample_align_corners_false():
    """NDC of a pixel centre, used as a grid_sample coordinate, reads exactly that pixel."""
    H, W = 5, 7
    image = torch.arange(H * W, dtype=DT).reshape(1, 1, H, W)
    v, u = torch.meshgrid(torch.arange(H, dtype=DT), torch.arange(W, dtype=DT), indexing="ij")
    grid = pixel_to_ndc(torch.stack([u, v], dim=-1), H, W)[None]  # (1, H, W, 2)
    out = torch.nn.functional.grid_sample(image, grid, align_corners=False)
    torch.testing.assert_close(out, image)


def test_depth_forms():
    n, f = 0.1, 20.0
    z = torch.tensor([n, f, 1.0, 5.0], dtype=DT)
    d = depth_to_ndc(z, n, f)
    torch.testing.assert_close(d[:2], torch.tensor([-1.0, 1.0], dtype=DT))
    assert bool(d[2] < d[3])
    zs = torch.linspace(n, f, 50, dtype=DT)
    assert bool((depth_to_ndc(zs, n, f).diff() > 0).all())
    torch.testing.assert_close(depth_to_unit(z[:2], n, f), torch.tensor([0.0, 1.0], dtype=DT))


def opengl_projection(K: torch.Tensor, near: float, far: float, height: int, width: int) -> torch.Tensor:
    """4x4 P (camera frame, OpenCV axes) with clip = P [X; 1], w_clip = z; NDC x/y follow image u/v.

    Built independently from the pinhole model: x_ndc = (2u+1)/W - 1 with u = (fx x + s y)/z + cx, so
    x_clip = (2fx/W) x + (2s/W) y + ((2cx+1)/W - 1) z; likewise y; z_clip = A z + B with A = (f+n)/(f-n),
    B = -2fn/(f-n).
    """
    P = torch.zeros(4, 4, dtype=K.dtype)
    P[0, 0], P[0, 1], P[0, 2] = 2 * K[0, 0] / width, 2 * K[0, 1] / width, (2 * K[0, 2] + 1) / width - 1
    P[1, 1], P[1, 2] = 2 * K[1, 1] / height, (2 * K[1, 2] + 1) / height - 1
    P[2, 2], P[2, 3] = (far + near) / (far - near), -2 * far * near / (far - near)
    P[3, 2] = 1.0
    return P


def test_points_to_ndc_matches_mvp_matrix():
    gen = torch.Generator().manual_seed(0)
    H, W, n, f = 48, 64, 0.1, 20.0
    for _ in range(5):
        K, w2c = random_camera(gen)
        K[0, 1] = 3.0  # skew, to exercise the full K
        cam = torch.randn(100, 3, generator=gen, dtype=DT)
        cam[:, 2] = torch.rand(100, generator=gen, dtype=DT) * 10 + 0.5  # in front of the camera
        world = (cam - w2c[:3, 3]) @ w2c[:3, :3]  # invert w2c: X = R^T (x_cam - t)
        mvp = opengl_projection(K, n, f, H, W) @ w2c  # (4, 4)
        clip = torch.cat([world, torch.ones(100, 1, dtype=DT)], dim=-1) @ mvp.T  # (N, 4)
        expected = clip[:, :3] / clip[:, 3:]
        ndc, valid = points_to_ndc(world, K, w2c, H, W, near=n, far=f)
        assert ndc.shape == (100, 3) and valid.shape == (100,) and bool(valid.all())
        assert (ndc - expected).abs().max().item() < 1e-5


def test_points_to_ndc_near_far_behind_and_batching():
    H, W, n, f = 40, 60, 0.1, 20.0
    K = torch.tensor([[50.0, 0, 29.5], [0, 50, 19.5], [0, 0, 1]], dtype=DT)
    w2c = torch.eye(4, dtype=DT)
    pts = torch.tensor([[0.0, 0, n], [0, 0, f], [0, 0, -1.0], [0, 0, 0.04], [0, 0, 0.06]], dtype=DT)
    ndc, valid = points_to_ndc(pts, K, w2c, H, W, near=n, far=f)
    torch.testing.assert_close(ndc[0], torch.tensor([0.0, 0.0, -1.0], dtype=DT))  # optical axis -> image centre
    torch.testing.assert_close(ndc[1], torch.tensor([0.0, 0.0, 1.0], dtype=DT))
    assert valid.tolist() == [True, True, False, False, True]  # z > near/2
    # leading dimensions broadcast: (B, 1, 3, 3) cameras against (B, T, N, 3) points
    gen = torch.Generator().manual_seed(1)
    Kb, w2cb = random_camera(gen, (2,))
    ptsb = torch.randn(2, 3, 8, 3, generator=gen, dtype=DT)
    ndcb, validb = points_to_ndc(ptsb, Kb[:, None], w2cb[:, None], H, W)
    assert ndcb.shape == (2, 3, 8, 3) and validb.shape == (2, 3, 8)
    single, _ = points_to_ndc(ptsb[1, 2], Kb[1], w2cb[1], H, W)
    torch.testing.assert_close(ndcb[1, 2], single)


@pytest.mark.parametrize("patch", [1, 2, 8, 16])
def test_token_grid_ndc_matches_patch_centres(patch):
    gh, gw = 3, 5
    grid = token_grid_ndc(gh, gw, dtype=DT)
    assert grid.shape == (gh * gw, 3)
    assert bool((grid[:, 2] == 0).all())
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=DT), torch.arange(gw, dtype=DT), indexing="ij")
    centre_px = torch.stack([cols, rows], dim=-1).reshape(-1, 2) * patch + (patch - 1) / 2  # (gh*gw, 2) as (u, v)
    torch.testing.assert_close(grid[:, :2], pixel_to_ndc(centre_px, gh * patch, gw * patch))


def test_token_grid_ndc_hand_values():
    grid = token_grid_ndc(2, 4)
    torch.testing.assert_close(grid[0], torch.tensor([-0.75, -0.5, 0.0]))  # row 0, column 0
    torch.testing.assert_close(grid[1], torch.tensor([-0.25, -0.5, 0.0]))  # row-major: column 1 next
    torch.testing.assert_close(grid[7], torch.tensor([0.75, 0.5, 0.0]))


def test_sinusoidal_embedding_values():
    x = torch.tensor([[0.0, 0.5]], dtype=DT)  # (1, C=2)
    e = sinusoidal_embedding(x, num_freqs=3)
    assert e.shape == (1, 2 * 2 * 3)
    # channel 0 (x=0): sines 0, cosines 1
    torch.testing.assert_close(e[0, :6], torch.tensor([0, 0, 0, 1, 1, 1], dtype=DT))
    # channel 1 (x=0.5): sin(π/2)=1, sin(π)=0, sin(2π)=0, cos(π/2)=0, cos(π)=-1, cos(2π)=1
    torch.testing.assert_close(e[0, 6:], torch.tensor([1, 0, 0, 0, -1, 1], dtype=DT), atol=1e-12, rtol=0)
    e_in = sinusoidal_embedding(torch.rand(4, 5, 3), num_freqs=4, include_input=True)
    assert e_in.shape == (4, 5, 3 + 3 * 2 * 4)
    e2 = sinusoidal_embedding(torch.tensor([0.25]), 1, base_scale=2 * math.pi)  # sin(π/2), cos(π/2)
    torch.testing.assert_close(e2, torch.tensor([1.0, 0.0]), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------- plucker


def point_ray_distance(p: torch.Tensor, o: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return torch.linalg.cross(p - o, d, dim=-1).norm(dim=-1)


def test_pixel_rays_pass_through_projected_points():
    gen = torch.Generator().manual_seed(2)
    H, W = 60, 60
    for _ in range(5):
        K, w2c = random_camera(gen)
        origins, dirs = pixel_rays(K, w2c, H, W)
        assert origins.shape == dirs.shape == (H, W, 3)
        torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(H, W, dtype=DT))
        torch.testing.assert_close(origins, camera_center(w2c).expand(H, W, 3))
        # pick pixels, lift them to random depths, and check the ray of that pixel hits the world point
        cam_dirs = torch.stack([torch.randint(0, W, (20,), generator=gen), torch.randint(0, H, (20,), generator=gen)],
                               dim=-1)
        depth = torch.rand(20, 1, generator=gen, dtype=DT) * 5 + 0.5
        pix_h = torch.cat([cam_dirs.to(DT), torch.ones(20, 1, dtype=DT)], dim=-1)
        cam = (pix_h @ torch.linalg.inv(K).T) * depth
        world = (cam - w2c[:3, 3]) @ w2c[:3, :3]
        uvz = project(world, K, w2c)
        torch.testing.assert_close(uvz[:, :2], cam_dirs.to(DT))  # the world points project to those pixels
        i, j = cam_dirs[:, 0], cam_dirs[:, 1]
        dist = point_ray_distance(world, origins[j, i], dirs[j, i])
        assert dist.max().item() < 1e-5
        assert bool(((world - origins[j, i]) * dirs[j, i]).sum(-1).gt(0).all())  # in front, along +d


def test_plucker_properties():
    gen = torch.Generator().manual_seed(3)
    H, W = 16, 20
    K, w2c = random_camera(gen, (2,))
    p = plucker(K, w2c, H, W)
    assert p.shape == (2, 6, H, W)
    m, d = p[:, :3], p[:, 3:]
    assert (m * d).sum(1).abs().max().item() < 1e-10  # moment ⟂ direction
    origins, dirs = pixel_rays(K, w2c, H, W)
    s = torch.randn(2, H, W, 1, generator=gen, dtype=DT) * 3
    m_shifted = torch.linalg.cross(origins + s * dirs, dirs, dim=-1)  # any other point on the ray
    torch.testing.assert_close(m_shifted.permute(0, 3, 1, 2), m)


def test_plucker_invariant_to_camera_moving_along_a_pixel_ray():
    gen = torch.Generator().manual_seed(4)
    H, W = 12, 14
    K, w2c = random_camera(gen)
    _, dirs = pixel_rays(K, w2c, H, W)
    j, i = 5, 9
    d = dirs[j, i]
    moved = w2c.clone()
    moved[:3, 3] = w2c[:3, 3] - 2.7 * (w2c[:3, :3] @ d)  # new centre c + 2.7 d, same rotation
    torch.testing.assert_close(camera_center(moved), camera_center(w2c) + 2.7 * d)
    torch.testing.assert_close(plucker(K, moved, H, W)[:, j, i], plucker(K, w2c, H, W)[:, j, i])
    # other pixels' moments do change (sanity: the test is not vacuous)
    assert (plucker(K, moved, H, W)[:3, 0, 0] - plucker(K, w2c, H, W)[:3, 0, 0]).abs().max().item() > 1e-3


def test_plucker_hand_computed():
    K = torch.tensor([[10.0, 0, 1], [0, 10, 1], [0, 0, 1]], dtype=DT)
    w2c = torch.eye(4, dtype=DT)
    w2c[:3, 3] = torch.tensor([-1.0, 0, 0], dtype=DT)  # camera centre at world (1, 0, 0)
    p = plucker(K, w2c, 3, 3)
    # centre pixel (1, 1): d = (0, 0, 1), o × d = (1, 0, 0) × (0, 0, 1) = (0, -1, 0)
    torch.testing.assert_close(p[:, 1, 1], torch.tensor([0.0, -1, 0, 0, 0, 1], dtype=DT))


@pytest.mark.parametrize("T", [1, 5, 9])
def test_plucker_latent_shapes(T):
    gen = torch.Generator().manual_seed(5)
    K, w2c = random_camera(gen, (2, T))
    out = plucker_latent(K, w2c, 64, 96)
    assert out.shape == (2, 1 + (T - 1) // 4, 24, 8, 12)


def test_plucker_latent_grouping_and_resolution():
    gen = torch.Generator().manual_seed(6)
    B, T, H, W, sf = 2, 9, 32, 48, 8
    K, w2c = random_camera(gen, (B, T))
    out = plucker_latent(K, w2c, H, W, spatial_factor=sf)
    h, w = H // sf, W // sf
    # reference: rays through each latent pixel's footprint centre (u, v) = (sf*b + (sf-1)/2, sf*a + (sf-1)/2)
    for t_lat, frames in enumerate([[0, 0, 0, 0], [1, 2, 3, 4], [5, 6, 7, 8]]):
        for k, t in enumerate(frames):
            a, b = torch.meshgrid(torch.arange(h, dtype=DT), torch.arange(w, dtype=DT), indexing="ij")
            uv1 = torch.stack([b * sf + (sf - 1) / 2, a * sf + (sf - 1) / 2, torch.ones_like(a)], dim=-1)
            d = torch.einsum("hwk,bjk->bhwj", uv1, torch.linalg.inv(K[:, t]))  # K^-1 [u, v, 1]
            d = torch.einsum("bhwj,bjk->bhwk", d, w2c[:, t, :3, :3])  # R^T d
            d = d / d.norm(dim=-1, keepdim=True)
            o = camera_center(w2c[:, t])[:, None, None].expand_as(d)
            ref = torch.cat([torch.linalg.cross(o, d, dim=-1), d], dim=-1).permute(0, 3, 1, 2)
            torch.testing.assert_close(out[:, t_lat, 6 * k:6 * k + 6], ref)
    # odd sf: footprint centre is an integer pixel, so the latent map equals subsampling the full map
    sf3 = 3
    out3 = plucker_latent(K[:, :5], w2c[:, :5], 24, 36, spatial_factor=sf3, patch=1)
    full = plucker(K[:, :5], w2c[:, :5], 24, 36)  # (B, 5, 6, 24, 36)
    torch.testing.assert_close(out3[:, 1, 6:12], full[:, 2, :, 1::3, 1::3])


def test_plucker_latent_rejects_bad_sizes():
    gen = torch.Generator().manual_seed(7)
    K, w2c = random_camera(gen, (1, 6))
    with pytest.raises(ValueError):
        plucker_latent(K, w2c, 64, 64)
    K, w2c = random_camera(gen, (1, 5))
    with pytest.raises(ValueError):
        plucker_latent(K, w2c, 60, 64)  # not divisible by 8
    with pytest.raises(ValueError):
        plucker_latent(K, w2c, 72, 64)  # latent 9 rows, not divisible by patch 2
    assert latent_frame_groups(9).tolist() == [[0, 0, 0, 0], [1, 2, 3, 4], [5, 6, 7, 8]]
