"""isa4d: 4D human video generation with interspatial attention (Shao et al., TOG 2025)."""

__version__ = "0.1.0"
