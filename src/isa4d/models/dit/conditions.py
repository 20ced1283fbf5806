"""What ISA-DiT is conditioned on, and how a clip's SMPL and cameras become it (paper §2.1-2.2, §3.2).

`DiTConditions` is the network's one conditioning contract. `PoseConditioner` builds its geometric part from a
batch's bodies and cameras: the fixed surface points (`isa4d.body.surface`) posed by smplx in every video frame,
grouped by latent frame, their camera NDC, their projection into the reference view, and the Plücker ray maps.

How the four video frames of a latent frame enter (PAPER.md §2.3 leaves it open; docs/model.md): a token's
content codes the world positions of its point in all the frames the latent frame covers (the point's motion
inside the latent frame), and its ISPE position is the mean of the point's NDC in those frames, each frame
projected with its own camera (`position_frame="mean"`; "center" and "last" are the alternatives).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields, replace

import torch
from einops import rearrange, repeat
from torch import nn

from isa4d.body.smpl import BodyModel, model_file
from isa4d.body.surface import BodySurface
from isa4d.geometry.ndc import points_to_ndc
from isa4d.geometry.plucker import latent_frame_groups, plucker_latent
from isa4d.render.normal_maps import normal_maps

POSITION_FRAMES = ("mean", "center", "last")


@dataclass(frozen=True)
class ConditionField:
    """What the code around the network needs to know of one `DiTConditions` field.

    time_axis: its latent-time axis, sliced by temporal windows (None: per clip, every window keeps it whole).
    people_axis: its people axis, padded with absent people by `pad_people` (None: no people axis).
    dtype: "compute", cast to the network's compute dtype at its input boundary (images, latents, tokens);
        "geometry", kept float32 until coded (positions and NDC lose their phase in bf16); "mask", bool.
    drop: the condition-dropout group that switches it off in training and for guidance (None: never dropped).
    """

    time_axis: int | None
    people_axis: int | None
    dtype: str
    drop: str | None


DTYPE_POLICIES = ("compute", "geometry", "mask")


def condition(*, time_axis: int | None = None, people_axis: int | None = None, dtype: str = "geometry",
              drop: str | None = None, optional: bool = False):
    """A `DiTConditions` field with its metadata; `optional` ones default to None (the network may not read them)."""
    if dtype not in DTYPE_POLICIES:
        raise ValueError(f"dtype policy must be one of {DTYPE_POLICIES}, got {dtype!r}")
    meta = {"condition": ConditionField(time_axis, people_axis, dtype, drop)}
    return field(default=None, metadata=meta) if optional else field(metadata=meta)


@dataclass(kw_only=True)
class DiTConditions:
    """Conditions of B clips with T latent frames of h x w latent pixels (H x W video pixels), P people (padded),
    V body points, F video frames per latent frame.

    Each field declares its metadata (`ConditionField`) where it is defined, and every generic operation (temporal
    windows, device and dtype moves, people padding, condition dropout's groups) reads it from there: a new
    condition is its field here, its embedder and its sub-layer in the network, nothing else. Dropout groups are
    listed in the order their first field appears (the order `ConditionDropout` draws them in).
    """

    ref_latent: torch.Tensor = condition(dtype="compute", drop="ref")  # (B, C, h, w) normalised VAE latent
    # (B, P, V, 2) the points' projection into the reference view (grid_sample coords)
    ref_points_ndc: torch.Tensor = condition(people_axis=1, drop="ref")
    # (B, P, V) bool: reference has a camera, real person, in front of it
    ref_points_valid: torch.Tensor = condition(people_axis=1, dtype="mask", drop="ref")
    points_world: torch.Tensor = condition(time_axis=2, people_axis=1, drop="pose")  # (B, P, T, F, V, 3) world
    points_ndc: torch.Tensor = condition(time_axis=2, people_axis=1, drop="pose")  # (B, P, T, V, 3) NDC for ISPE
    # (B, P, T, V) bool: a real person, in front of the camera
    points_valid: torch.Tensor = condition(time_axis=2, people_axis=1, dtype="mask", drop="pose")
    person_mask: torch.Tensor = condition(people_axis=1, dtype="mask")  # (B, P) bool
    plucker: torch.Tensor = condition(time_axis=1, dtype="compute", drop="camera")  # (B, T, 6F, h, w)
    # (B, C, T, h, w) normalised background latent, zeros where none
    background: torch.Tensor | None = condition(time_axis=2, dtype="compute", drop="background", optional=True)
    # (B, R, E) tokens of an optional image encoder
    ref_features: torch.Tensor | None = condition(dtype="compute", drop="ref", optional=True)
    # (B, T, 3F, H, W) camera-space normals of the posed bodies in each video frame, 0 where no body (2D-map
    # baseline, `isa4d.render.normal_maps`)
    body_maps: torch.Tensor | None = condition(time_axis=1, dtype="compute", drop="pose", optional=True)

    @classmethod
    def spec(cls) -> dict[str, ConditionField]:
        """Every field's metadata, by name, in declaration order."""
        return {f.name: f.metadata["condition"] for f in fields(cls)}

    @classmethod
    def dropout_groups(cls) -> tuple[str, ...]:
        """The condition-dropout groups, in the order their first field is declared."""
        return tuple(dict.fromkeys(m.drop for m in cls.spec().values() if m.drop is not None))

    def __len__(self) -> int:
        return self.person_mask.shape[0]

    @property
    def num_frames(self) -> int:
        """T, the latent frames the conditions cover."""
        return self.points_world.shape[self.spec()["points_world"].time_axis]

    def apply(self, fn, names=None) -> "DiTConditions":
        """`fn` applied to every present tensor (or to the fields in `names`), as a new DiTConditions."""
        return replace(self, **{n: fn(v) for n in (names or self.spec())
                                if (v := getattr(self, n)) is not None})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "DiTConditions":
        """Moved to `device`; `dtype` casts the "compute" fields only (geometry stays float32, masks bool)."""
        out = self if device is None else self.apply(lambda t: t.to(device))
        if dtype is None:
            return out
        return out.apply(lambda t: t.to(dtype), [n for n, m in self.spec().items() if m.dtype == "compute"])

    def slice(self, start: int, stop: int) -> "DiTConditions":
        """The conditions of latent frames [start, stop) as views, not copies: every field with a time axis is
        narrowed, the per-clip ones (person mask, reference) are kept whole."""
        T = self.num_frames
        timed = {n: m.time_axis for n, m in self.spec().items() if m.time_axis is not None}
        for name, axis in timed.items():
            value = getattr(self, name)
            if value is not None and value.shape[axis] != T:
                raise ValueError(f"{name} has {value.shape[axis]} latent frames on axis {axis}, points_world {T}")
        if not 0 <= start < stop <= T:
            raise ValueError(f"latent frames [{start}, {stop}) are not a non-empty range of [0, {T})")
        return replace(self, **{n: v.narrow(axis, start, stop - start) for n, axis in timed.items()
                                if (v := getattr(self, n)) is not None})

    def pad_people(self, people: int) -> "DiTConditions":
        """The same conditions with the people axis padded to `people` by absent people (all their points and
        reference projections invalid), so batches of any people count have one shape (for torch.compile). The
        network's output does not change: absent people's tokens are masked out of everything the video reads."""
        P = self.person_mask.shape[1]
        if P >= people:
            return self

        def padder(axis: int):
            def pad(t: torch.Tensor) -> torch.Tensor:
                shape = list(t.shape)
                shape[axis] = people - P
                return torch.cat([t, t.new_zeros(shape)], dim=axis)
            return pad

        return replace(self, **{n: padder(m.people_axis)(v) for n, m in self.spec().items()
                                if m.people_axis is not None and (v := getattr(self, n)) is not None})

    def repeat(self, n: int) -> "DiTConditions":
        """Each tensor stacked n times along the batch (for batched guidance)."""
        return self.apply(lambda t: torch.cat([t] * n, dim=0))


class PoseConditioner(nn.Module):
    """Bodies and cameras of a clip -> the geometric fields of `DiTConditions`.

    The surface samples are persistent buffers (they define which body point each 3D token is and must travel
    with the checkpoint); the body model's data is never saved (licensed SMPL files, `isa4d.body.smpl`).
    Gendered models are used for samples labelled male/female when their files exist in `body_model_dir`;
    otherwise the neutral model, with one warning.
    """

    def __init__(self, body_model_dir: str, num_points: int, surface_seed: int = 0, min_points_per_part: int = 2,
                 temporal_factor: int = 4, spatial_factor: int = 8, patch: int = 2, near: float = 0.1,
                 far: float = 20.0, position_frame: str = "mean", use_gender: bool = True, body_maps: bool = False):
        """`body_maps`: also render the posed meshes' normal maps in every video frame (the 2D-map baseline's
        `DiTConditions.body_maps`; `isa4d.render.normal_maps`, exact rasterisation in PyTorch on the batch's
        device)."""
        super().__init__()
        if position_frame not in POSITION_FRAMES:
            raise ValueError(f"position_frame must be one of {POSITION_FRAMES}, got {position_frame!r}")
        self.temporal_factor, self.spatial_factor, self.patch = temporal_factor, spatial_factor, patch
        self.near, self.far, self.position_frame, self.body_maps = near, far, position_frame, body_maps
        genders = ["neutral"]
        if use_gender:
            genders += [g for g in ("male", "female") if _has_model(body_model_dir, g)]
        self.bodies = nn.ModuleDict({g: BodyModel(body_model_dir, g) for g in genders})
        neutral = self.bodies["neutral"]
        self.surface = BodySurface.from_body_model(neutral, num_points, surface_seed, neutral.part_ids,
                                                   min_points_per_part)
        self._warned: set[str] = set()

    @property
    def num_points(self) -> int:
        return self.surface.num_points

    def pose(self, betas: torch.Tensor, global_orient: torch.Tensor, body_pose: torch.Tensor, transl: torch.Tensor,
             gender: list[str] | None = None) -> torch.Tensor:
        """Surface points of B sequences of P people, (B, P, T, V, 3), each sample posed with its gender's body."""
        return self._posed(betas, global_orient, body_pose, transl, gender, self.surface)

    def mesh(self, betas: torch.Tensor, global_orient: torch.Tensor, body_pose: torch.Tensor, transl: torch.Tensor,
             gender: list[str] | None = None) -> torch.Tensor:
        """All mesh vertices of B sequences of P people, (B, P, T, V_mesh, 3) (for rendering silhouettes and part
        maps; the faces and part ids are `self.bodies["neutral"]`'s, shared by the genders)."""
        return self._posed(betas, global_orient, body_pose, transl, gender, lambda verts: verts)

    def _posed(self, betas, global_orient, body_pose, transl, gender, select) -> torch.Tensor:
        """`select(vertices)` of every sample posed with its gender's body model."""
        B = betas.shape[0]
        groups = {}
        for i, g in enumerate(gender or ["neutral"] * B):
            g = g.lower()
            if g not in self.bodies:
                if g not in self._warned and g in ("male", "female"):
                    warnings.warn(f"no SMPL_{g.upper()}.pkl in the body model folder: posing {g} bodies with the "
                                  f"neutral model", stacklevel=3)
                    self._warned.add(g)
                g = "neutral"
            groups.setdefault(g, []).append(i)
        out = None
        for g, idx in groups.items():
            ix = torch.tensor(idx, device=betas.device)
            verts, _ = self.bodies[g](betas[ix], global_orient[ix], body_pose[ix], transl[ix])  # (b, P, T, Vm, 3)
            pts = select(verts)  # (b, P, T, V, 3)
            if out is None:
                out = pts.new_zeros((B,) + pts.shape[1:])
            out[ix] = pts
        return out

    def forward(self, K: torch.Tensor, w2c: torch.Tensor, smpl, person_mask: torch.Tensor, ref_K: torch.Tensor,
                ref_w2c: torch.Tensor, ref_smpl, ref_has_camera: torch.Tensor, height: int, width: int,
                gender: list[str] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Cameras K (B, T, 3, 3), w2c (B, T, 4, 4) of an H x W clip, `smpl`/`ref_smpl` as `isa4d.data.SMPLBatch`.

        Returns (the geometric `DiTConditions` fields as a dict, the posed points of every video frame
        (B, P, T_video, V, 3) for overlays).
        """
        groups = latent_frame_groups(K.shape[1], self.temporal_factor).to(K.device)  # (T, F)
        points = self.pose(smpl.betas, smpl.global_orient, smpl.body_pose, smpl.transl, gender)  # (B, P, Tv, V, 3)
        ndc, valid = points_to_ndc(points, K[:, None], w2c[:, None], height, width, self.near, self.far)
        valid = valid & person_mask[:, :, None, None]  # (B, P, Tv, V)
        ndc, valid = ndc[:, :, groups], valid[:, :, groups]  # (B, P, T, F, V, 3), (B, P, T, F, V)
        if self.position_frame == "mean":
            pos, ok = ndc.mean(dim=3), valid.all(dim=3)
        else:
            k = self.temporal_factor // 2 if self.position_frame == "center" else -1
            pos, ok = ndc[:, :, :, k], valid[:, :, :, k]
        pos = torch.where(ok[..., None], pos, torch.zeros_like(pos))  # no inf/nan from points behind the camera

        ref_points = self.pose(ref_smpl.betas, ref_smpl.global_orient, ref_smpl.body_pose, ref_smpl.transl, gender)
        ref_ndc, ref_ok = points_to_ndc(ref_points[:, :, 0], ref_K[:, None], ref_w2c[:, None], height, width,
                                        self.near, self.far)  # (B, P, V, 3), (B, P, V)
        ref_ok = ref_ok & person_mask[:, :, None] & ref_has_camera[:, None, None]
        ref_xy = torch.where(ref_ok[..., None], ref_ndc[..., :2], torch.zeros_like(ref_ndc[..., :2]))
        if self.body_maps:
            geometry_maps = self.normal_maps(K, w2c, smpl, person_mask, height, width, gender)[:, groups]
        geometry = dict(
            points_world=points[:, :, groups],  # (B, P, T, F, V, 3)
            points_ndc=pos,
            points_valid=ok,
            person_mask=person_mask,
            plucker=plucker_latent(K, w2c, height, width, self.temporal_factor, self.spatial_factor, self.patch),
            ref_points_ndc=ref_xy,
            ref_points_valid=ref_ok,
        )
        if self.body_maps:
            geometry["body_maps"] = rearrange(geometry_maps, "b t f c h w -> b t (f c) h w")  # (B, T, 3F, H, W)
        return geometry, points

    def normal_maps(self, K: torch.Tensor, w2c: torch.Tensor, smpl, person_mask: torch.Tensor, height: int,
                    width: int, gender: list[str] | None = None) -> torch.Tensor:
        """Camera-space normal maps of the posed meshes in every video frame, (B, T_video, 3, H, W); an absent
        (padded) person draws nothing, occlusion between people is resolved by depth."""
        verts = self.mesh(smpl.betas, smpl.global_orient, smpl.body_pose, smpl.transl, gender)  # (B, P, Tv, Vm, 3)
        B, P, Tv = verts.shape[:3]
        maps = normal_maps(rearrange(verts, "b p t v c -> (b t) p v c"), self.bodies["neutral"].faces,
                           rearrange(K, "b t i j -> (b t) i j"), rearrange(w2c, "b t i j -> (b t) i j"),
                           repeat(person_mask, "b p -> (b t) p", t=Tv), height, width, self.near, self.far)
        return rearrange(maps, "(b t) c h w -> b t c h w", b=B)  # (B, Tv, 3, H, W)


def _has_model(model_dir: str, gender: str) -> bool:
    try:
        return model_file(model_dir, gender).is_file()
    except (FileNotFoundError, ValueError):
        return False
