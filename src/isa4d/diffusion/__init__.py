"""Rectified-flow diffusion pieces (paper §5.1), kept apart from the network (STYLE rule 5).

`schedules` holds pure functions of t (training-time samplers, SD3's time shift, sampling grids), `flow` the
flow-matching objective that wraps any network `net(x_t, t, **cond) -> v`, and `sampling` the Euler loop and
classifier-free guidance. Convention throughout: x_t = (1 − t)·x0 + t·ε, t = 0 is data, t = 1 is noise, and the
network predicts v = x0 − ε (Liu et al. 2022, "Flow Straight and Fast"; Esser et al. 2024, SD3).
"""
