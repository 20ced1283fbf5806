"""ISA-DiT: the flow-matching diffusion transformer with interspatial attention (paper §3, Fig. 3).

forward(x_t, t, cond) -> v, the velocity of rectified flow (isa4d.diffusion). Tokenisers run once:
  video tokens  = Patchify(concat_channels(x_t, background latent or zeros))           (B, T, N, D)
  3D tokens     = MLP(PE(world points)) + person/point embeddings
                  + GridSample(reference features, projection into the reference view)  (B, T, M, D), M = P·V
  camera tokens = Patchify(Plücker rays of the frames of each latent frame)              (B, T, N, D)
  ref tokens    = Patchify(reference latent) + its grid code [+ image-encoder tokens]    (B, R, D)
then N `ISADiTBlock`s and a final layer that unpatchifies the video tokens. Conditions are dropped per sample by
`ConditionDropout` (training, or `force_drop` for guidance): a dropped reference or camera becomes a learned null
token, a dropped pose masks every 3D token out of the video's view, a dropped background is the zero latent,
which is also what a clip without background gets (paper §3.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from isa4d.geometry.ndc import sinusoidal_embedding, token_grid_ndc
from isa4d.models.dit.attention import grid_positions, rope_frequencies
from isa4d.models.dit.blocks import BlockInputs, FinalLayer, ISADiTBlock
from isa4d.models.dit.conditions import DiTConditions
from isa4d.models.dit.embeddings import (ConditionDropout, MapEmbedder, PatchEmbed, PointEmbedder, TimestepEmbedder,
                                         unpatchify)
from isa4d.models.dit.isa import ispe_code


# How the body enters: "points", ISA's 3D tokens (the paper's model); "maps", 2D normal maps of the posed bodies
# added to the video tokens with ISA off (the paper's ControlNet baseline); "none", no pose at all.
POSES = ("points", "maps", "none")


class ISADiT(nn.Module):
    # Under FSDP mixed precision the model casts its own inputs (tokens to the parameters' dtype); geometry (rotary
    # angles, ISPE's NDC and its sinusoids, world points before their code) must stay fp32: positions of 30 latent
    # frames or NDC at 2^7·π rad lose their phase in bf16.
    fsdp_cast_inputs = False

    def __init__(
        self,
        latent_channels: int = 16,
        hidden_size: int = 1024,
        depth: int = 16,
        num_heads: int = 16,
        patch_size: int = 2,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        frames_per_latent: int = 4,
        num_points: int = 1024,
        max_people: int = 4,
        point_freqs: int = 8,
        world_extent: float = 4.0,
        point_embedding: bool = True,
        use_ispe: bool = True,
        ispe_freqs: int = 8,
        background: bool = True,
        camera: bool = True,
        ref_tokens: bool = True,
        ref_points: bool = True,
        ref_feature_dim: int = 0,
        condition_dropout: dict[str, float] | None = None,
        rope_theta: float = 10_000.0,
        pose: str = "points",
        spatial_factor: int = 8,
    ):
        config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}  # the constructor's arguments
        super().__init__()
        self.config = config  # rebuilds the same network (e.g. on the meta device to count its FLOPs)
        head_dim = hidden_size // num_heads if hidden_size % num_heads == 0 else 0
        if head_dim == 0 or head_dim % 4:
            raise ValueError(f"hidden_size ({hidden_size}) / num_heads ({num_heads}) must be an integer head size "
                             f"divisible by 4 (2D rotary positions)")
        if pose not in POSES:
            raise ValueError(f"pose must be one of {POSES}, got {pose!r}")
        self.latent_channels, self.patch_size, self.num_points = latent_channels, patch_size, num_points
        self.pose, self.max_people, self.spatial_factor = pose, max_people, spatial_factor
        self.frames_per_latent, self.head_dim, self.rope_theta = frames_per_latent, head_dim, rope_theta
        self.background, self.ref_points, self.ispe_freqs = background, ref_points and pose == "points", ispe_freqs
        self.x_embedder = PatchEmbed(latent_channels * (2 if background else 1), hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        points = pose == "points"
        self.point_embedder = PointEmbedder(hidden_size, frames_per_latent, num_points, max_people, point_freqs,
                                            world_extent, point_embedding) if points else None
        self.condition_dropout = ConditionDropout(condition_dropout)
        # 3D identity path: reference latent -> features sampled at the points' reference-view projection
        self.ref_point_features = nn.Conv2d(latent_channels, hidden_size, 3, padding=1) \
            if ref_points and points else None
        # camera path
        self.camera_embedder = PatchEmbed(6 * frames_per_latent, hidden_size, patch_size) if camera else None
        self.null_camera = nn.Parameter(torch.zeros(hidden_size)) if camera else None
        # 2D identity path: reference latent tokens with a code of their grid position, optional encoder tokens
        self.ref_embedder = PatchEmbed(latent_channels, hidden_size, patch_size) if ref_tokens else None
        self.ref_position = nn.Linear(2 * 2 * ispe_freqs, hidden_size) if ref_tokens else None
        self.ref_feature_proj = nn.Linear(ref_feature_dim, hidden_size) if ref_tokens and ref_feature_dim else None
        self.null_ref = nn.Parameter(torch.zeros(hidden_size)) if ref_tokens else None
        self.blocks = nn.ModuleList([
            ISADiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, use_ispe, ispe_freqs, camera, ref_tokens,
                        update_points=i < depth - 1,  # the last block's 3D output would never be read
                        points=points)
            for i in range(depth)
        ])
        # 2D-map baseline (ISA off): normal maps of the posed bodies, ControlNet-lite onto the video tokens
        self.map_embedder = MapEmbedder(3 * frames_per_latent, hidden_size, patch_size * spatial_factor) \
            if pose == "maps" else None
        self.final_layer = FinalLayer(hidden_size, latent_channels * patch_size ** 2)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's scheme: Xavier-uniform linear maps, zero biases; adaLN and the output stay zero (set by their
        modules), so at initialisation every block is the identity and the prediction is 0."""
        zero_init = {id(m.adaLN_modulation[-1]) for m in self.modules() if hasattr(m, "adaLN_modulation")}
        zero_init.add(id(self.final_layer.linear))
        if self.map_embedder is not None:
            zero_init.add(id(self.map_embedder.proj))
        for m in self.modules():
            if isinstance(m, nn.Linear) and id(m) not in zero_init:
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.null_camera, self.null_ref):
            if p is not None:
                nn.init.normal_(p, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

    def fsdp_units(self) -> list[nn.Module]:
        """The modules `isa4d.parallel` wraps one by one (activation checkpointing, compile, FSDP)."""
        return list(self.blocks)

    # ------------------------------------------------------------------------------------------ tokenisers

    def _points(self, cond: DiTConditions, drop: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """3D tokens (B, T, M, D) and the mask of the ones the video may read (B, T, M)."""
        y = self.point_embedder(cond.points_world)  # (B, P, T, V, D)
        if self.ref_points:
            feats = self.ref_point_features(cond.ref_latent.to(y.dtype))  # (B, D, h, w)
            grid = cond.ref_points_ndc.to(feats.dtype)  # (B, P, V, 2), NDC = grid_sample's align_corners=False
            sampled = F.grid_sample(feats, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            keep = cond.ref_points_valid & ~drop["ref"][:, None, None]  # (B, P, V)
            sampled = rearrange(sampled, "b d p v -> b p v d") * keep[..., None].to(feats.dtype)
            # the reference texture follows its point through time; grid_sample runs in fp32 under autocast, and
            # its sum must not promote the 3D stream (12x the video tokens at 256²) to an fp32 residual
            y = y + sampled[:, :, None].to(y.dtype)
        mask = cond.points_valid & ~drop["pose"][:, None, None, None]  # (B, P, T, V)
        return rearrange(y, "b p t v d -> b t (p v) d"), rearrange(mask, "b p t v -> b t (p v)")

    def _camera(self, cond: DiTConditions, drop: torch.Tensor) -> torch.Tensor | None:
        if self.camera_embedder is None:
            return None
        cam = self.camera_embedder(rearrange(cond.plucker, "b t c h w -> b c t h w"))  # (B, T, N, D)
        return torch.where(drop[:, None, None, None], self.null_camera.to(cam.dtype), cam)

    def _ref(self, cond: DiTConditions, drop: torch.Tensor) -> torch.Tensor | None:
        if self.ref_embedder is None:
            return None
        ref = self.ref_embedder(cond.ref_latent[:, :, None])[:, 0]  # (B, R, D)
        h, w = (s // self.patch_size for s in cond.ref_latent.shape[-2:])
        xy = token_grid_ndc(h, w, device=ref.device)[:, :2]  # (R, 2), fp32
        ref = ref + self.ref_position(sinusoidal_embedding(xy, self.ispe_freqs).to(ref.dtype))
        if self.ref_feature_proj is not None:
            if cond.ref_features is None:
                raise ValueError("the network was built with ref_feature_dim > 0 but cond.ref_features is None")
            ref = torch.cat([ref, self.ref_feature_proj(cond.ref_features.to(ref.dtype))], dim=1)  # (B, R + E, D)
        return torch.where(drop[:, None, None], self.null_ref.to(ref.dtype), ref)

    # ----------------------------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: DiTConditions, force_drop: dict | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """x (B, C, T, h, w) noisy latent, t (B,) in [0, 1] -> predicted velocity (B, C, T, h, w)."""
        B, C, T, h, w = x.shape
        if C != self.latent_channels:
            raise ValueError(f"expected {self.latent_channels} latent channels, got {C}")
        if cond.points_world.shape[2] != T or cond.plucker.shape[1] != T:
            raise ValueError(f"conditions cover {cond.points_world.shape[2]} latent frames, the latent {T}")
        gh, gw = h // self.patch_size, w // self.patch_size
        # compute in the parameters' dtype (bf16 under FSDP mixed precision); geometry stays fp32 until coded
        dtype = self.x_embedder.proj.weight.dtype
        x = x.to(dtype)
        cond = cond.to(dtype=dtype)  # the "compute" fields; geometry stays fp32, masks bool
        drop = self.condition_dropout(B, x.device, force_drop, generator)

        # 1. tokens
        if self.background:
            bg = cond.background if cond.background is not None else torch.zeros_like(x)
            bg = torch.where(drop["background"][:, None, None, None, None], torch.zeros_like(bg), bg)
            x = torch.cat([x, bg.to(x.dtype)], dim=1)  # (B, 2C, T, h, w)
        z = self.x_embedder(x)  # (B, T, N, D)
        if self.map_embedder is not None:
            if cond.body_maps is None:
                raise ValueError("the network was built with pose='maps' but cond.body_maps is None")
            z = z + self.map_embedder(cond.body_maps, drop["pose"])  # (B, T, N, D)
        y = y_mask = y_code = None
        if self.point_embedder is not None:
            y, y_mask = self._points(cond, drop)  # (B, T, M, D), (B, T, M)
            y_code = ispe_code(rearrange(cond.points_ndc, "b p t v c -> b t (p v) c"), self.ispe_freqs)
        c = self.t_embedder(t)  # (B, D)
        inputs = BlockInputs(
            spatial_rope=rope_frequencies(grid_positions(gh, gw, device=x.device),
                                          (self.head_dim // 2, self.head_dim // 2), self.rope_theta),
            temporal_rope=rope_frequencies(grid_positions(T, device=x.device), (self.head_dim,), self.rope_theta),
            z_code=ispe_code(token_grid_ndc(gh, gw, device=x.device), self.ispe_freqs),  # (N, C)
            y_code=y_code,
            y_mask=y_mask,
            camera=self._camera(cond, drop["camera"]),
            ref=self._ref(cond, drop["ref"]),
        )

        # 2. blocks
        for block in self.blocks:
            z, y = block(z, y, c, inputs)

        # 3. velocity
        out = self.final_layer(z, c)  # (B, T, N, C·p²)
        return unpatchify(out, self.patch_size, gh, gw)  # (B, C, T, h, w)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
