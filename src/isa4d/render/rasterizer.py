"""Headless, exact rasteriser for posed triangle meshes (moderngl on EGL).

One pass renders every mesh with the depth test into a framebuffer with three colour attachments:
  0: RGBA8  shaded albedo, alpha = 1 where covered (premultiplied; composited over the background in numpy),
  1: RG16I  (instance_id, part_id + 1), flat, never blended or multisampled,
  2: RGBA32F (camera-space normal xyz, camera z), z interpolated perspective-correctly, so it is exact at pixel centres.
With samples > 0 the meshes are drawn a second time into a multisample RGBA8 target that is resolved and replaces
attachment 0 (ids, depth and normals stay unaliased). See docs/rendering.md and camera_gl.py for the conventions.

GL contexts are bound to the thread and do not survive fork: create the renderer inside each DataLoader worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from isa4d.render.camera_gl import projection_from_K

DEFAULT_ALBEDO = (0.7, 0.7, 0.7)

_VERTEX_SHADER = """
#version 330
uniform mat4 u_w2c;
uniform mat4 u_proj;
uniform mat3 u_nmat;
in vec3 in_pos;
in vec3 in_nrm;
in vec3 in_col;
in vec2 in_uv;
in int in_part;
out vec3 v_pcam;
out vec3 v_ncam;
out vec3 v_col;
out vec2 v_uv;
flat out int v_part;
void main() {
    vec4 pc = u_w2c * vec4(in_pos, 1.0);
    v_pcam = pc.xyz;
    v_ncam = u_nmat * in_nrm;
    v_col = in_col;
    v_uv = in_uv;
    v_part = in_part;
    gl_Position = u_proj * pc;
}
"""

_FRAGMENT_SHADER = """
#version 330
uniform vec3 u_light;       // unit vector from the surface towards the light, camera space
uniform float u_ambient;
uniform int u_instance;
uniform bool u_textured;
uniform sampler2D u_tex;
in vec3 v_pcam;
in vec3 v_ncam;
in vec3 v_col;
in vec2 v_uv;
flat in int v_part;
layout(location = 0) out vec4 o_rgba;
layout(location = 1) out ivec2 o_ids;
layout(location = 2) out vec4 o_geom;
void main() {
    vec3 n = v_ncam;
    if (dot(n, n) < 1e-20) n = cross(dFdx(v_pcam), dFdy(v_pcam));   // degenerate vertex normal: use the face's
    n = normalize(n);
    if (dot(n, v_pcam) > 0.0) n = -n;                               // two-sided: face the camera
    float lam = max(dot(n, u_light), 0.0);
    // uv in the OBJ convention: (0, 0) is the bottom-left of the image, whose row 0 is uploaded at t = 0.
    vec3 albedo = u_textured ? texture(u_tex, vec2(v_uv.x, 1.0 - v_uv.y)).rgb : v_col;
    o_rgba = vec4(albedo * clamp(u_ambient + (1.0 - u_ambient) * lam, 0.0, 1.0), 1.0);
    o_ids = ivec2(u_instance, v_part + 1);
    o_geom = vec4(n, v_pcam.z);
}
"""


class RenderError(RuntimeError):
    """Raised when headless OpenGL is unavailable or rendering fails."""


@dataclass
class Mesh:
    """A triangle mesh in world coordinates. Give at most one of colors / face_colors / texture (with uv);
    with none the albedo is a uniform grey. Pass fields by keyword."""

    vertices: np.ndarray                    # (V,3) float
    faces: np.ndarray                       # (F,3) int
    colors: np.ndarray | None = None        # (V,3) float in [0,1], per-vertex albedo (interpolated)
    face_colors: np.ndarray | None = None   # (F,3) float in [0,1], per-face albedo (flat)
    uv: np.ndarray | None = None            # (V,2) texture coordinates, OBJ convention (v up)
    texture: np.ndarray | None = None       # (h,w,3) uint8, row 0 = top of the image
    part_ids: np.ndarray | None = None      # (V,) int; a face takes its first vertex's part (flat)
    instance_id: int = 1                    # 1-based person index; 0 is reserved for background


@dataclass
class RenderOutput:
    rgb: np.ndarray                 # (H,W,3) uint8, shaded albedo over the background
    depth: np.ndarray               # (H,W) float32 camera z, +inf where uncovered
    instance: np.ndarray            # (H,W) int16, instance_id of the visible mesh, 0 background
    part: np.ndarray                # (H,W) int16, part id + 1 of the visible surface, 0 background / no part ids
    normal: np.ndarray | None = None  # (H,W,3) float32 unit camera-space normals facing the camera, 0 uncovered


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals (V,3), unit length (zero for unreferenced / degenerate vertices)."""
    v = np.asarray(vertices, dtype=np.float64)
    tri = v[faces]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = 2 * area
    idx = faces.reshape(-1)
    vn = np.stack([np.bincount(idx, np.repeat(fn[:, k], 3), minlength=len(v)) for k in range(3)], axis=1)
    vn = vn.astype(np.float64, copy=False)  # bincount of nothing is int
    norm = np.linalg.norm(vn, axis=1, keepdims=True)
    return np.divide(vn, norm, out=np.zeros_like(vn), where=norm > 0)


def mesh_geometry(mesh: Mesh) -> tuple[np.ndarray, np.ndarray]:
    """The mesh's vertices (V,3) float64 and faces (F,3) int, checked."""
    verts = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces)
    if verts.ndim != 2 or verts.shape[1] != 3:
        raise ValueError(f"vertices must be (V,3), got {verts.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3 or not np.issubdtype(faces.dtype, np.integer):
        raise ValueError(f"faces must be (F,3) int, got {faces.shape} {faces.dtype}")
    if faces.size and (faces.min() < 0 or faces.max() >= len(verts)):
        raise ValueError("faces index out of range")
    return verts, faces


def _mesh_arrays(mesh: Mesh) -> tuple[np.ndarray, np.ndarray]:
    """Unrolled per-corner arrays: float32 (3F, 11) = pos, normal, albedo, uv; int32 (3F,) part id (-1 if none)."""
    verts, faces = mesh_geometry(mesh)
    given = [n for n in ("colors", "face_colors", "texture") if getattr(mesh, n) is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of colors / face_colors / texture, got {given}")
    if not 0 <= int(mesh.instance_id) <= 32767:
        raise ValueError(f"instance_id must be in [0, 32767], got {mesh.instance_id}")
    F = len(faces)
    out = np.empty((F, 3, 11), dtype=np.float32)
    out[..., 0:3] = verts[faces]
    out[..., 3:6] = vertex_normals(verts, faces)[faces]
    out[..., 6:9] = DEFAULT_ALBEDO
    out[..., 9:11] = 0.0
    if mesh.colors is not None:
        out[..., 6:9] = np.asarray(mesh.colors, dtype=np.float32).reshape(len(verts), 3)[faces]
    elif mesh.face_colors is not None:
        out[..., 6:9] = np.asarray(mesh.face_colors, dtype=np.float32).reshape(F, 1, 3)
    elif mesh.texture is not None:
        if mesh.uv is None:
            raise ValueError("a texture needs per-vertex uv")
        out[..., 9:11] = np.asarray(mesh.uv, dtype=np.float32).reshape(len(verts), 2)[faces]
    if mesh.part_ids is not None:
        pid = np.asarray(mesh.part_ids).reshape(len(verts))
        if pid.size and (pid.min() < 0 or pid.max() > 32766):
            raise ValueError("part_ids must be in [0, 32766]")
        part = np.repeat(pid[faces[:, 0]].astype(np.int32), 3)
    else:
        part = np.full(3 * F, -1, dtype=np.int32)
    return out.reshape(3 * F, 11), part


def _create_context(device_index: int | None):
    try:
        import moderngl
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RenderError(f"moderngl is not installed ({e}); pip install moderngl") from e
    kwargs = {"backend": "egl", "require": 330}
    if device_index is not None:
        kwargs["device_index"] = int(device_index)
    try:
        return moderngl, moderngl.create_standalone_context(**kwargs)
    except Exception as e:
        raise RenderError(
            f"headless OpenGL (EGL) is not available: {type(e).__name__}: {e}; install libegl1 and the Mesa "
            "drivers (Debian/Ubuntu: apt-get install libegl1 libgl1 libegl-mesa0 libgl1-mesa-dri libgbm1) or the "
            "NVIDIA driver's EGL library (libnvidia-gl / NVIDIA_DRIVER_CAPABILITIES including 'graphics')"
        ) from e


class MeshRenderer:
    """Renders lists of meshes with an OpenCV camera. Create once, call render() many times, close() at the end.

    device_index selects the EGL device (GLCONTEXT_DEVICE_INDEX also works); None lets EGL choose.
    """

    def __init__(self, height: int, width: int, *, near: float = 0.05, far: float = 100.0, samples: int = 0,
                 device_index: int | None = None):
        if height <= 0 or width <= 0:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        if not 0.0 < near < far:
            raise ValueError(f"need 0 < near < far, got {near}, {far}")
        self.height, self.width, self.near, self.far = int(height), int(width), float(near), float(far)
        self._mgl, self._ctx = _create_context(device_index)
        ctx, size = self._ctx, (self.width, self.height)
        try:
            ctx.__enter__()  # make this context current (several renderers may coexist in one thread)
            self.samples = min(int(samples), ctx.max_samples) if samples > 0 else 0
            self._prog = ctx.program(vertex_shader=_VERTEX_SHADER, fragment_shader=_FRAGMENT_SHADER)
            self._prog["u_tex"].value = 0
            self._tex_rgba = ctx.texture(size, 4, dtype="f1")
            self._tex_ids = ctx.texture(size, 2, dtype="i2")
            self._tex_geom = ctx.texture(size, 4, dtype="f4")
            for t in (self._tex_rgba, self._tex_ids, self._tex_geom):
                t.filter = (self._mgl.NEAREST, self._mgl.NEAREST)
            self._depth = ctx.depth_renderbuffer(size)
            self._fbo = ctx.framebuffer([self._tex_rgba, self._tex_ids, self._tex_geom], self._depth)
            self._fbo_ms = None
            if self.samples:
                self._rb_ms = ctx.renderbuffer(size, 4, samples=self.samples)
                self._depth_ms = ctx.depth_renderbuffer(size, samples=self.samples)
                self._fbo_ms = ctx.framebuffer([self._rb_ms], self._depth_ms)
                self._fbo_resolve = ctx.framebuffer([self._tex_rgba])
            self._dummy_tex = ctx.texture((1, 1), 3, data=bytes([255, 255, 255]))
            self._slots: list[tuple] = []  # reused (float buffer, int buffer, vao) per mesh slot
            ctx.__exit__(None, None, None)
        except Exception as e:
            self._ctx.release()
            raise RenderError(f"could not set up the OpenGL renderer: {type(e).__name__}: {e}") from e
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if not getattr(self, "_closed", True):
            self._closed = True
            self._ctx.release()

    def __enter__(self) -> "MeshRenderer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # best effort
        try:
            self.close()
        except Exception:
            pass

    @property
    def info(self) -> dict:
        with self._ctx:
            return dict(self._ctx.info)

    # ------------------------------------------------------------------ internals
    def _slot(self, i: int, nbytes_f: int, nbytes_i: int):
        ctx = self._ctx
        if i < len(self._slots):
            fbuf, ibuf, vao = self._slots[i]
            if fbuf.size >= nbytes_f and ibuf.size >= nbytes_i:
                return fbuf, ibuf, vao
            vao.release(), fbuf.release(), ibuf.release()
        cap = 1 << max(12, int(np.ceil(np.log2(max(nbytes_f, 1)))))  # grow by powers of two
        fbuf, ibuf = ctx.buffer(reserve=cap), ctx.buffer(reserve=max(cap // 11, 4096))
        vao = ctx.vertex_array(self._prog, [(fbuf, "3f 3f 3f 2f", "in_pos", "in_nrm", "in_col", "in_uv"),
                                            (ibuf, "i", "in_part")])
        if i < len(self._slots):
            self._slots[i] = (fbuf, ibuf, vao)
        else:
            self._slots.append((fbuf, ibuf, vao))
        return fbuf, ibuf, vao

    def _upload_texture(self, image: np.ndarray):
        img = np.ascontiguousarray(np.asarray(image))
        if img.ndim != 3 or img.shape[2] not in (3, 4) or img.dtype != np.uint8:
            raise ValueError(f"texture must be (h,w,3|4) uint8, got {img.shape} {img.dtype}")
        tex = self._ctx.texture((img.shape[1], img.shape[0]), img.shape[2], data=img.tobytes())
        tex.build_mipmaps()
        tex.filter = (self._mgl.LINEAR_MIPMAP_LINEAR, self._mgl.LINEAR)
        return tex

    # ------------------------------------------------------------------ rendering
    def render(self, meshes: Sequence[Mesh], K: np.ndarray, w2c: np.ndarray, *, background: np.ndarray | None = None,
               light_dir_cam=(0.3, -0.5, -1.0), ambient: float = 0.35, with_normal: bool = True) -> RenderOutput:
        """Render `meshes` seen by the camera (K, w2c). light_dir_cam points from the surface towards the light
        (camera axes); colour = albedo * clamp(ambient + (1 - ambient) * max(n.l, 0), 0, 1)."""
        if self._closed:
            raise RenderError("renderer is closed")
        H, W = self.height, self.width
        if background is not None:
            background = np.asarray(background)
            if background.shape != (H, W, 3) or background.dtype != np.uint8:
                raise ValueError(f"background must be ({H},{W},3) uint8, got {background.shape} {background.dtype}")
        w2c = np.asarray(w2c, dtype=np.float64)
        if w2c.shape != (4, 4):
            raise ValueError(f"w2c must be (4,4), got {w2c.shape}")
        proj = projection_from_K(K, H, W, self.near, self.far)
        nmat = np.linalg.inv(w2c[:3, :3]).T
        light = np.asarray(light_dir_cam, dtype=np.float64).reshape(3)
        light = light / max(np.linalg.norm(light), 1e-12)

        prog, ctx = self._prog, self._ctx
        with ctx:
            prog["u_w2c"].write(w2c.T.astype("f4").tobytes())  # GLSL matrices are column-major
            prog["u_proj"].write(proj.T.astype("f4").tobytes())
            prog["u_nmat"].write(nmat.T.astype("f4").tobytes())
            prog["u_light"].value = tuple(float(x) for x in light)
            prog["u_ambient"].value = float(ambient)
            draws, textures = [], []
            for i, mesh in enumerate(meshes):
                fdata, idata = _mesh_arrays(mesh)
                if len(fdata) == 0:
                    continue
                fbuf, ibuf, vao = self._slot(i, fdata.nbytes, idata.nbytes)
                fbuf.write(fdata.tobytes())
                ibuf.write(idata.tobytes())
                tex = self._upload_texture(mesh.texture) if mesh.texture is not None else None
                if tex is not None:
                    textures.append(tex)
                draws.append((vao, len(fdata), int(mesh.instance_id), tex))

            ctx.enable_only(self._mgl.DEPTH_TEST)
            ctx.depth_func = "<"
            targets = [self._fbo] + ([self._fbo_ms] if self._fbo_ms is not None else [])
            try:
                for fbo in targets:
                    fbo.use()
                    fbo.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)
                    for vao, n, inst, tex in draws:
                        prog["u_instance"].value = inst
                        prog["u_textured"].value = tex is not None
                        (tex or self._dummy_tex).use(0)
                        vao.render(self._mgl.TRIANGLES, vertices=n)
                if self._fbo_ms is not None:
                    ctx.copy_framebuffer(self._fbo_resolve, self._fbo_ms)
                rgba = np.frombuffer(self._tex_rgba.read(), np.uint8).reshape(H, W, 4)
                ids = np.frombuffer(self._tex_ids.read(), np.int16).reshape(H, W, 2)
                geom = np.frombuffer(self._tex_geom.read(), np.float32).reshape(H, W, 4)
                err = ctx.error
            finally:
                for t in textures:
                    t.release()
            if err != "GL_NO_ERROR":
                raise RenderError(f"OpenGL error while rendering: {err}")

        covered = geom[..., 3] > 0.0  # every drawn fragment has z >= near > 0; cleared pixels are 0
        depth = np.where(covered, geom[..., 3], np.float32(np.inf)).astype(np.float32)
        rgb = rgba[..., :3]
        if background is not None:
            a = rgba[..., 3:4].astype(np.uint16)
            rgb = (rgb + ((255 - a) * background + 127) // 255).clip(0, 255).astype(np.uint8)
        else:
            rgb = rgb.copy()
        normal = np.where(covered[..., None], geom[..., :3], 0.0).astype(np.float32) if with_normal else None
        return RenderOutput(rgb=rgb, depth=depth, instance=ids[..., 0].copy(), part=ids[..., 1].copy(), normal=normal)
