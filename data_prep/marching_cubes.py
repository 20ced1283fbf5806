"""A small, self-contained marching cubes in numpy (no scikit-image).

The case table is *generated* rather than typed in: for each of the 256 corner sign patterns the
iso-contour is traced on the six cube faces and every closed contour loop is fan-triangulated.
Ambiguous faces (two diagonal inside corners) always separate the inside corners. Because the
per-face decision depends only on the four face corners, neighbouring cubes agree on every shared
face, so the extracted surface is crack-free. Vertices live on grid edges and are shared through a
global edge index, so a field that is positive on the grid boundary gives a closed, consistently
oriented (outward normals, towards positive field) triangle mesh.
"""

from __future__ import annotations

import numpy as np

# corner n sits at (n & 1, n >> 1 & 1, n >> 2 & 1)
CORNERS = np.array([[(n >> a) & 1 for a in range(3)] for n in range(8)], dtype=np.int64)
# edge = (lower corner, upper corner, axis); the lower corner names the global grid edge
EDGES = [(n, n | (1 << axis), axis) for axis in range(3) for n in range(8) if not n & (1 << axis)]
_EDGE_OF = {}
for _i, (_a, _b, _) in enumerate(EDGES):
    _EDGE_OF[(_a, _b)] = _EDGE_OF[(_b, _a)] = _i
_MID = np.array([(CORNERS[a] + CORNERS[b]) / 2.0 for a, b, _ in EDGES])


def _cube_faces():
    faces = []
    for axis in range(3):
        u, v = [a for a in range(3) if a != axis]
        for side in (0, 1):
            cyc = [(side << axis) | (du << u) | (dv << v) for du, dv in ((0, 0), (1, 0), (1, 1), (0, 1))]
            normal = np.zeros(3)
            normal[axis] = 1.0 if side else -1.0
            faces.append((cyc, normal))
    return faces


_FACES = _cube_faces()
_EDGE_FACES = [[fi for fi, (cyc, _) in enumerate(_FACES) if a in cyc and b in cyc] for a, b, _ in EDGES]


def _case_triangles(mask: int) -> list[tuple[int, int, int]]:
    inside = [(mask >> n) & 1 for n in range(8)]
    nxt: dict[int, int] = {}
    for cyc, normal in _FACES:
        flags = [inside[c] for c in cyc]
        cross = [k for k in range(4) if flags[k] != flags[(k + 1) % 4]]
        segs = []
        if len(cross) == 2:
            pos = CORNERS[[c for c in cyc if not inside[c]]].mean(0)
            neg = CORNERS[[c for c in cyc if inside[c]]].mean(0)
            segs.append((cross[0], cross[1], pos - neg))
        elif len(cross) == 4:  # ambiguous face: cut off each inside corner on its own
            for k in range(4):
                if flags[k]:
                    e1, e2 = (k - 1) % 4, k
                    ends = [_EDGE_OF[(cyc[e], cyc[(e + 1) % 4])] for e in (e1, e2)]
                    segs.append((e1, e2, _MID[ends].mean(0) - CORNERS[cyc[k]]))
        for ka, kb, g in segs:
            ea = _EDGE_OF[(cyc[ka], cyc[(ka + 1) % 4])]
            eb = _EDGE_OF[(cyc[kb], cyc[(kb + 1) % 4])]
            # boundary of the outward-facing patch runs along g x n_face (patch lies inside the cube)
            if (_MID[eb] - _MID[ea]) @ np.cross(g, normal) < 0:
                ea, eb = eb, ea
            assert ea not in nxt
            nxt[ea] = eb
    tris = []
    todo = set(nxt)
    while todo:
        start = min(todo)
        loop = [start]
        todo.discard(start)
        while nxt[loop[-1]] != start:
            loop.append(nxt[loop[-1]])
            todo.discard(loop[-1])
        tris.extend(_fan(loop))
    return tris


def _shares_face(e1: int, e2: int) -> bool:
    return bool(set(_EDGE_FACES[e1]) & set(_EDGE_FACES[e2]))


def _fan(loop: list[int]) -> list[tuple[int, int, int]]:
    """Fan-triangulate a contour loop from a start whose diagonals never lie in a cube face
    (a diagonal on a shared face could be created by both neighbouring cubes)."""
    n = len(loop)
    for s in range(n):
        rot = loop[s:] + loop[:s]
        if all(not _shares_face(rot[0], rot[i]) for i in range(2, n - 1)):
            return [(rot[0], rot[i], rot[i + 1]) for i in range(1, n - 1)]
    raise RuntimeError(f"no safe fan for loop {loop}")


def _build_table() -> tuple[np.ndarray, np.ndarray]:
    cases = [_case_triangles(m) for m in range(256)]
    max_t = max(len(c) for c in cases)
    table = -np.ones((256, max_t, 3), dtype=np.int64)
    for m, c in enumerate(cases):
        if c:
            table[m, : len(c)] = c
    return table, np.array([len(c) for c in cases], dtype=np.int64)


TRI_TABLE, TRI_COUNT = _build_table()
_EDGE_LOWER = np.array([a for a, _, _ in EDGES], dtype=np.int64)
_EDGE_AXIS = np.array([ax for _, _, ax in EDGES], dtype=np.int64)


def marching_cubes(values: np.ndarray, origin, spacing: float, t_clamp: float = 0.05):
    """Extract the zero level set of ``values`` (negative inside) sampled on a regular grid.

    Returns ``(vertices (V, 3) float64, faces (F, 3) int64)`` with outward (towards positive)
    counter-clockwise triangles. ``t_clamp`` keeps vertices away from grid corners so that no two
    vertices coincide.
    """
    values = np.asarray(values, dtype=np.float64)
    nx, ny, nz = values.shape
    inside = values < 0
    cfg = np.zeros((nx - 1, ny - 1, nz - 1), dtype=np.int64)
    for n in range(8):
        dx, dy, dz = CORNERS[n]
        cfg |= inside[dx : nx - 1 + dx, dy : ny - 1 + dy, dz : nz - 1 + dz].astype(np.int64) << n
    cells = np.argwhere((cfg > 0) & (cfg < 255))
    case = cfg[cells[:, 0], cells[:, 1], cells[:, 2]]
    counts = TRI_COUNT[case]
    cell_of_tri = np.repeat(np.arange(len(cells)), counts)
    k_in_cell = np.arange(len(cell_of_tri)) - np.repeat(np.cumsum(counts) - counts, counts)
    local = TRI_TABLE[case[cell_of_tri], k_in_cell]  # (F, 3) local edge ids
    lower = cells[cell_of_tri][:, None, :] + CORNERS[_EDGE_LOWER[local]]  # (F, 3, 3) grid corner
    n_pts = nx * ny * nz
    key = _EDGE_AXIS[local] * n_pts + np.ravel_multi_index(
        (lower[..., 0], lower[..., 1], lower[..., 2]), (nx, ny, nz))
    ukey, faces = np.unique(key.ravel(), return_inverse=True)
    faces = faces.reshape(-1, 3)
    axis, lin = np.divmod(ukey, n_pts)
    i0 = np.stack(np.unravel_index(lin, (nx, ny, nz)), axis=1)
    i1 = i0 + np.eye(3, dtype=np.int64)[axis]
    f0 = values[i0[:, 0], i0[:, 1], i0[:, 2]]
    f1 = values[i1[:, 0], i1[:, 1], i1[:, 2]]
    t = np.clip(f0 / (f0 - f1), t_clamp, 1.0 - t_clamp)
    verts = np.asarray(origin, dtype=np.float64) + spacing * (i0 + t[:, None] * (i1 - i0))
    return verts, faces.astype(np.int64)
