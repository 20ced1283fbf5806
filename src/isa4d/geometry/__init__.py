"""Cameras and projection. Conventions: OpenCV pinhole, pixel centres at integer coordinates."""
