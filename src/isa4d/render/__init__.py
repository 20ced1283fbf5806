"""Rendering of posed meshes with OpenCV cameras: headless OpenGL (moderngl/EGL), or exact PyTorch rasterisation of
ids, depth and normal maps. See docs/rendering.md."""

from isa4d.render.camera_gl import linearize_depth, mvp_from_camera, ndc_to_pixel, projection_from_K
from isa4d.render.rasterizer import Mesh, MeshRenderer, RenderError, RenderOutput, vertex_normals
from isa4d.render.normal_maps import normal_maps
from isa4d.render.torch_raster import TorchRenderer, make_renderer

__all__ = [
    "Mesh",
    "MeshRenderer",
    "RenderError",
    "RenderOutput",
    "TorchRenderer",
    "linearize_depth",
    "make_renderer",
    "mvp_from_camera",
    "normal_maps",
    "ndc_to_pixel",
    "projection_from_K",
    "vertex_normals",
]
