"""Evaluation metrics, each a torchmetrics `Metric` (single-device code; torchmetrics syncs the states).
See docs/metrics.md for each metric's protocol, network and weights."""

from isa4d.metrics.appearance import PartAppearance, part_color_stats
from isa4d.metrics.body_maps import NUM_PARTS, render_body_maps
from isa4d.metrics.fvd import FVD, frechet_distance, frechet_distance_features, gaussian_stats, preprocess_clips
from isa4d.metrics.i3d import I3DWeightsMissing, InceptionI3d, i3d_weights_path
from isa4d.metrics.identity import (
    FACE_LANDMARKS,
    DlibFaceEmbedder,
    FaceSimilarity,
    face_boxes,
    face_landmark_vertex_ids,
)
from isa4d.metrics.pose import SilhouetteIoU, silhouette_from_background
from isa4d.metrics.reconstruction import VideoLPIPS, VideoPSNR, VideoSSIM, psnr_per_frame, ssim_per_frame

__all__ = [
    "FACE_LANDMARKS", "FVD", "NUM_PARTS", "DlibFaceEmbedder", "FaceSimilarity", "I3DWeightsMissing", "InceptionI3d",
    "PartAppearance", "SilhouetteIoU", "VideoLPIPS", "VideoPSNR", "VideoSSIM", "face_boxes",
    "face_landmark_vertex_ids", "frechet_distance", "frechet_distance_features", "gaussian_stats",
    "i3d_weights_path", "part_color_stats", "preprocess_clips", "psnr_per_frame", "render_body_maps",
    "silhouette_from_background", "ssim_per_frame",
]
