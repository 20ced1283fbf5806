"""OpenCV pinhole camera (K, w2c) -> OpenGL clip-space matrices, exactly.

Project convention (see isa4d.geometry.camera): camera axes x right, y down, z forward; a camera-space point
(x, y, z) lands at pixel u = fx*x/z + s*y/z + cx, v = fy*y/z + cy, and pixel (i, j) (column i, row j) has its centre
at (u, v) = (i, j), so a W-wide image covers u in [-0.5, W-0.5].

OpenGL rasterises in window coordinates x_w = (x_ndc + 1) * W/2 with pixel i covering x_w in [i, i+1] (centre at
i + 0.5). Hence x_w = u + 0.5, i.e. x_ndc = (2u + 1)/W - 1. With clip w = z (camera looks along +z, no negation):

    x_clip = (2 fx/W) x + (2 s/W) y + ((2 cx + 1)/W - 1) z
    y_clip =              (2 fy/H) y + ((2 cy + 1)/H - 1) z
    z_clip = a z + b,   a = (far + near)/(far - near),  b = -2 far near/(far - near)   (z_ndc = -1 at near, +1 at far)
    w_clip = z

For y we use the same map without flipping: y_w = v + 0.5. GL's framebuffer row 0 is the one at y_w in [0, 1],
i.e. image row v = 0 = the TOP of the image, so the raw glReadPixels buffer is already in image order (row 0 = top)
and no flip is needed on readback. The price is that the on-screen handedness is mirrored relative to GL's usual
y-up, so triangle winding (front/back) is reversed; the renderer does not cull faces, so this does not matter.
"""

from __future__ import annotations

import numpy as np


def projection_from_K(K: np.ndarray, height: int, width: int, near: float, far: float) -> np.ndarray:
    """(4,4) float64 matrix mapping homogeneous camera-space points (OpenCV axes) to GL clip space."""
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3):
        raise ValueError(f"K must be (3,3), got {K.shape}")
    if not (0.0 < near < far):
        raise ValueError(f"need 0 < near < far, got near={near}, far={far}")
    if abs(K[2, 0]) > 1e-12 or abs(K[2, 1]) > 1e-12 or abs(K[2, 2] - 1.0) > 1e-9 or abs(K[1, 0]) > 1e-12:
        raise ValueError(f"K must be upper-triangular with K[2] = (0, 0, 1), got\n{K}")
    fx, s, cx = K[0]
    fy, cy = K[1, 1], K[1, 2]
    W, H = float(width), float(height)
    P = np.zeros((4, 4), dtype=np.float64)
    P[0, 0], P[0, 1], P[0, 2] = 2.0 * fx / W, 2.0 * s / W, (2.0 * cx + 1.0) / W - 1.0
    P[1, 1], P[1, 2] = 2.0 * fy / H, (2.0 * cy + 1.0) / H - 1.0
    P[2, 2], P[2, 3] = (far + near) / (far - near), -2.0 * far * near / (far - near)
    P[3, 2] = 1.0
    return P


def mvp_from_camera(K: np.ndarray, w2c: np.ndarray, height: int, width: int, near: float, far: float) -> np.ndarray:
    """(4,4) float64 world -> clip matrix, P @ w2c."""
    w2c = np.asarray(w2c, dtype=np.float64)
    if w2c.shape != (4, 4):
        raise ValueError(f"w2c must be (4,4), got {w2c.shape}")
    return projection_from_K(K, height, width, near, far) @ w2c


def ndc_to_pixel(ndc_xy: np.ndarray, height: int, width: int) -> np.ndarray:
    """Inverse of the viewport map, for checks: NDC (..., 2) -> OpenCV pixel coordinates (u, v)."""
    ndc_xy = np.asarray(ndc_xy, dtype=np.float64)
    u = (ndc_xy[..., 0] + 1.0) * width / 2.0 - 0.5
    v = (ndc_xy[..., 1] + 1.0) * height / 2.0 - 0.5
    return np.stack([u, v], axis=-1)


def linearize_depth(depth01: np.ndarray, near: float, far: float) -> np.ndarray:
    """GL depth-buffer values in [0, 1] (default glDepthRange) -> camera z, for the projection above."""
    z_ndc = 2.0 * np.asarray(depth01, dtype=np.float64) - 1.0
    return 2.0 * far * near / ((far + near) - z_ndc * (far - near))
