"""Procedural backgrounds: a textured floor (y = 0) inside a textured room, rendered as meshes.

Because the background is geometry seen by the same camera as the people, perspective, parallax and camera
motion are all consistent. A scene is a floor quad (tiles / checker / planks / speckle), four walls sharing one
texture (bricks / stripes / blobs under a sky gradient) and a few boxes against the walls. All meshes have
``instance_id = 0`` and no part ids, so they read as background in the instance and part maps.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image

from isa4d.render import Mesh

ROOM_HALF = 10.0  # metres
CAMERA_MAX_RADIUS = 7.5  # cameras stay this close to the room's centre, clear of the boxes
WALL_HEIGHT = 12.0
FLOOR_KINDS = ("tiles", "checker", "planks", "speckle")
WALL_KINDS = ("bricks", "stripes", "blobs")


def _colour(rng, sat=(0.2, 0.7), val=(0.35, 0.9)) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*sat), rng.uniform(*val)))


def _smooth_noise(rng, size: int, cells: int) -> np.ndarray:
    """(size, size) value noise in [0, 1], tileable (wraps around)."""
    base = rng.uniform(0, 1, (cells, cells))
    tiled = Image.fromarray((np.tile(base, (3, 3)) * 255).astype(np.uint8))
    img = tiled.resize((3 * size, 3 * size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float64)[size:2 * size, size:2 * size] / 255.0


def _to_u8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def floor_texture(rng, kind: str, size: int = 128) -> np.ndarray:
    """(size, size, 3) uint8, one repeat of the floor pattern."""
    a, b = _colour(rng), _colour(rng)
    yy, xx = np.mgrid[0:size, 0:size] / size
    noise = _smooth_noise(rng, size, 8)[..., None]
    if kind == "checker":
        img = np.where(((xx * 2).astype(int) + (yy * 2).astype(int))[..., None] % 2 == 0, a, b)
    elif kind == "tiles":
        grout = ((xx * 4) % 1 < 0.06) | ((yy * 4) % 1 < 0.06)
        img = np.where(grout[..., None], 0.35 * a, a * (0.85 + 0.15 * noise))
    elif kind == "planks":
        row = (yy * 6).astype(int)
        shift = (xx + 0.37 * row) % 1
        seam = ((yy * 6) % 1 < 0.05) | (shift < 0.015)
        tone = 0.8 + 0.2 * ((row * 7919) % 5) / 4
        img = np.where(seam[..., None], 0.4 * a, a * tone[..., None] * (0.8 + 0.2 * noise))
    elif kind == "speckle":
        img = a * (0.7 + 0.3 * noise) + 0.25 * (rng.uniform(0, 1, (size, size, 1)) > 0.9) * (b - a)
    else:
        raise ValueError(f"unknown floor kind {kind!r}")
    return _to_u8(img)


def wall_texture(rng, kind: str, size: int = 128) -> np.ndarray:
    """(size, size, 3) uint8 for the walls: a pattern at the bottom, a sky gradient above (v = 1 at the top)."""
    a, b = _colour(rng), _colour(rng)
    yy, xx = np.mgrid[0:size, 0:size] / size  # yy = 0 is the top row (the sky)
    noise = _smooth_noise(rng, size, 6)[..., None]
    if kind == "bricks":
        row = (yy * 16).astype(int)
        mortar = ((yy * 16) % 1 < 0.12) | (((xx * 8) + 0.5 * (row % 2)) % 1 < 0.06)
        img = np.where(mortar[..., None], 0.85 * np.ones(3), a * (0.8 + 0.2 * noise))
    elif kind == "stripes":
        img = np.where(((xx * 10).astype(int) % 2 == 0)[..., None], a, b) * (0.85 + 0.15 * noise)
    elif kind == "blobs":
        img = a + (b - a) * (_smooth_noise(rng, size, 5)[..., None] > 0.5)
    else:
        raise ValueError(f"unknown wall kind {kind!r}")
    sky_top, sky_low = _colour(rng, (0.3, 0.7), (0.6, 1.0)), np.array([0.92, 0.95, 1.0])
    t = np.clip((0.55 - yy) / 0.55, 0, 1)[..., None]  # top 55 % of the wall (about 6.6 m up) is sky
    sky = sky_low + (sky_top - sky_low) * t
    return _to_u8(np.where(t > 0, sky, img))


def _quad(corners: np.ndarray, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return corners, np.array([[0, 1, 2], [0, 2, 3]]), uv


def floor_mesh(rng) -> Mesh:
    r, tile = ROOM_HALF, rng.uniform(0.8, 2.0)  # metres per texture repeat
    v = np.array([[-r, 0, -r], [r, 0, -r], [r, 0, r], [-r, 0, r]], dtype=np.float64)
    uv = v[:, [0, 2]] / tile
    return Mesh(vertices=v, faces=np.array([[0, 1, 2], [0, 2, 3]]), uv=uv,
                texture=floor_texture(rng, str(rng.choice(FLOOR_KINDS))), instance_id=0)


def walls_mesh(rng) -> Mesh:
    """Four walls, one texture; u runs along the wall (a repeat every few metres), v = 1 at the top."""
    r, h, rep = ROOM_HALF, WALL_HEIGHT, rng.uniform(3.0, 6.0)
    corners = np.array([[-r, -r], [r, -r], [r, r], [-r, r], [-r, -r]])
    verts, faces, uvs = [], [], []
    for k in range(4):
        (x0, z0), (x1, z1) = corners[k], corners[k + 1]
        verts += [[x0, 0, z0], [x1, 0, z1], [x1, h, z1], [x0, h, z0]]
        u1 = 2 * r / rep
        uvs += [[0, 0], [u1, 0], [u1, 1], [0, 1]]
        faces += [[4 * k, 4 * k + 1, 4 * k + 2], [4 * k, 4 * k + 2, 4 * k + 3]]
    return Mesh(vertices=np.array(verts, dtype=np.float64), faces=np.array(faces),
                uv=np.array(uvs, dtype=np.float64), texture=wall_texture(rng, str(rng.choice(WALL_KINDS))),
                instance_id=0)


def box_mesh(centre, size, colour: np.ndarray, rng) -> Mesh:
    """An axis-aligned box standing on the floor, a slightly different shade per side."""
    cx, cz = centre
    sx, sy, sz = size
    xs, ys, zs = (cx - sx / 2, cx + sx / 2), (0.0, sy), (cz - sz / 2, cz + sz / 2)
    corners = np.array([[x, y, z] for x in xs for y in ys for z in zs])
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    faces = np.array([[a, b, c] for q in quads for a, b, c in ((q[0], q[1], q[2]), (q[0], q[2], q[3]))])
    shade = np.repeat(rng.uniform(0.8, 1.0, (6, 1)), 2, axis=0)
    return Mesh(vertices=corners, faces=faces, face_colors=np.clip(colour * shade, 0, 1), instance_id=0)


def make_scene(rng: np.random.Generator, num_boxes: tuple[int, int] = (0, 4)) -> list[Mesh]:
    """Floor, walls and a few boxes along the walls (never in the middle, where the people are)."""
    meshes = [floor_mesh(rng), walls_mesh(rng)]
    for _ in range(int(rng.integers(num_boxes[0], num_boxes[1] + 1))):
        size = rng.uniform([0.5, 0.5, 0.5], [2.0, 2.5, 2.0])
        along, side = rng.uniform(-ROOM_HALF + 1.5, ROOM_HALF - 1.5), rng.integers(4)
        off = ROOM_HALF - 0.1 - size.max() / 2  # against the wall, beyond CAMERA_MAX_RADIUS
        centre = [(along, off), (along, -off), (off, along), (-off, along)][side]
        meshes.append(box_mesh(centre, size, _colour(rng, (0.2, 0.8), (0.3, 0.9)), rng))
    return meshes


def light_direction(rng: np.random.Generator, towards: np.ndarray | None = None) -> np.ndarray:
    """A world-space unit vector from the surface towards the light (sun-like, 30-70 deg up). With `towards`
    (a horizontal direction, e.g. to the camera) the light comes from within 80 deg of it, so the side of the
    people the camera sees is lit and their colours stay recognisable."""
    az = rng.uniform(0, 2 * np.pi)
    if towards is not None:
        az = np.arctan2(towards[0], towards[2]) + np.deg2rad(rng.uniform(-80, 80))
    el = np.deg2rad(rng.uniform(30, 70))
    return np.array([np.cos(el) * np.sin(az), np.sin(el), np.cos(el) * np.cos(az)])
