"""Inference: drive a trained ISA-DiT with a reference image, SMPL motions and a camera path (docs/inference.md)."""
