"""RefNet: a per-class label embedding followed by a 2D UNet that predicts a corrected label slice.

The raw label slice is also added to the logits as a scaled one-hot ("identity start"): with the
UNet's last layer zero-initialised, an untrained RefNet returns its input unchanged, and training
only has to learn corrections. This is what keeps thin and small classes (portal vein, adrenals)
from being erased early in training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from monai.networks.nets import BasicUNet
from torch import nn

from .labels import NUM_CLASSES

__all__ = ["RefNet", "RefNetConfig"]


@dataclass(frozen=True)
class RefNetConfig:
    """Architecture of a RefNet; stored whole in the model file."""

    num_classes: int = NUM_CLASSES  # classes in and out (13: background + 12 organs)
    embed_dim: int = 8  # length of the learned vector per class
    context: int = 1  # neighbouring slices on each side fed as extra embedded channels (0 = pure 2D)
    ct_channels: int = 0  # windowed CT channels concatenated after the embedding (0 = labels only)
    component_channel: bool = False  # the centre slice's 3D component sizes (refnet.components) after the CT
    position_channels: bool = False  # two planes of offset from the labelled centroid (refnet.position), last
    features: tuple[int, ...] = (16, 32, 64, 128, 256, 16)  # monai BasicUNet feature sizes
    identity_scale: float = 4.0  # weight of the raw one-hot added to the logits (0 disables)
    dropout: float = 0.0
    norm: str = "batch"  # "batch": fixed statistics at inference, so whole slices and crops agree;
    #                      "instance": files written before the spacing-aware engine


    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}.")
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}.")
        if self.context < 0 or self.ct_channels < 0:
            raise ValueError(f"context and ct_channels must be >= 0, got {self.context}, {self.ct_channels}.")
        if self.norm not in ("batch", "instance"):
            raise ValueError(f"norm must be 'batch' or 'instance', got {self.norm!r}.")
        if len(self.features) != 6:
            raise ValueError(f"features needs 6 sizes (BasicUNet), got {len(self.features)}.")
        object.__setattr__(self, "features", tuple(int(f) for f in self.features))

    @property
    def aux_channels(self) -> int:
        """Float channels after the embedded slab: the CT channels, the component map, the position planes."""
        return self.ct_channels + int(self.component_channel) + 2 * int(self.position_channels)

    @property
    def slices(self) -> int:
        """Label slices per sample: the centre slice plus ``context`` on each side."""
        return 2 * self.context + 1

    def to_dict(self) -> dict:
        """Plain-types form for the model file."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class RefNet(nn.Module):
    """Label-embedding 2D UNet refiner.

    Args:
        config: architecture; see :class:`RefNetConfig`.
    """

    def __init__(self, config: RefNetConfig | None = None) -> None:
        super().__init__()
        config = config if config is not None else RefNetConfig()
        self.config = config
        self.embedding = nn.Embedding(config.num_classes, config.embed_dim)
        in_channels = config.slices * config.embed_dim + config.aux_channels
        self.unet = BasicUNet(
            spatial_dims=2, in_channels=in_channels, out_channels=config.num_classes,
            features=config.features, dropout=config.dropout,
            norm=("batch", {}) if config.norm == "batch" else ("instance", {"affine": True}),
        )
        if config.identity_scale > 0:
            nn.init.zeros_(self.unet.final_conv.weight)
            nn.init.zeros_(self.unet.final_conv.bias)

    def embed(self, slices: torch.Tensor) -> torch.Tensor:
        """(N, H, W) integer classes -> (N, E, H, W) embedded slices (a view, not contiguous).

        Refinement embeds each slice of a volume once and gathers it into every slab it serves
        (:meth:`forward_slices`) instead of once per neighbour; the numbers are the same.
        """
        return self.embedding(slices.long()).permute(0, 3, 1, 2)

    def forward_slices(self, slices: torch.Tensor, index: torch.Tensor, ct: torch.Tensor | None = None, *,
                       unet: nn.Module | None = None, channels_last: bool = False) -> torch.Tensor:
        """Refine a batch given as distinct slices and, per sample, which of them form its slab.

        Args:
            slices: (N, H, W) integer classes.
            index: (B, S) int64 indices into ``slices``, centre slice in the middle.
            ct: as in :meth:`forward`.
            unet: run this (e.g. a ``torch.compile`` of ``self.unet``) instead of ``self.unet``.
            channels_last: feed the UNet channels-last activations (faster convolutions on GPUs).

        Returns:
            (B, C, H, W) float logits, equal to ``forward(slices[index], ct)``.
        """
        b, s = index.shape
        if s != self.config.slices:
            raise ValueError(f"expected {self.config.slices} label slices per sample, got {s}.")
        h, w = slices.shape[-2:]
        emb = self.embed(slices).contiguous()  # (N, E, H, W): the gather below then needs no second copy
        x = emb[index.reshape(-1)].reshape(b, s * self.config.embed_dim, h, w)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._decode(x, slices[index[:, self.config.context]], ct, unet)

    def forward(self, labels: torch.Tensor, ct: torch.Tensor | None = None, *, channels_last: bool = False
                ) -> torch.Tensor:
        """Refine a batch of label slices.

        Args:
            labels: (B, S, H, W) integer class indices, S = ``config.slices``, centre slice in the middle.
            ct: (B, aux_channels, H, W) float32 in [0, 1]: the windowed CT channels, then the decoded
                component map (:func:`refnet.components.decode_component_map`), the position planes
                (:func:`refnet.position.position_planes`), each if the config uses it; required iff
                ``aux_channels > 0``.
            channels_last: channels-last activations (faster convolutions; the same numbers up to rounding).

        Returns:
            (B, C, H, W) float32 logits for the centre slice.
        """
        cfg = self.config
        b, s, h, w = labels.shape
        if s != cfg.slices:
            raise ValueError(f"expected {cfg.slices} label slices per sample, got {s}.")
        x = self.embed(labels.reshape(b * s, h, w)).reshape(b, s * cfg.embed_dim, h, w)  # (B, S*E, H, W)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._decode(x, labels[:, cfg.context], ct)

    def _decode(self, x: torch.Tensor, centre: torch.Tensor, ct: torch.Tensor | None,
                unet: nn.Module | None = None) -> torch.Tensor:
        """UNet over the embedded slab (plus the aux channels), then the identity start on the centre slice."""
        cfg = self.config
        if cfg.aux_channels:
            if ct is None or ct.shape[1] != cfg.aux_channels:
                what = [f"{cfg.ct_channels} CT channel(s)"] if cfg.ct_channels else []
                what += ["the component map channel"] if cfg.component_channel else []
                what += ["the 2 position channels"] if cfg.position_channels else []
                raise ValueError(f"this RefNet needs {' and '.join(what)} ({cfg.aux_channels} in all); "
                                 "pass them as ct.")
            x = torch.cat([x, ct.to(x.dtype)], dim=1)  # (B, S*E + aux, H, W)
        logits = (self.unet if unet is None else unet)(x)  # (B, C, H, W)
        if cfg.identity_scale > 0:
            # logits + scale * one_hot(centre), without building the (B, C, H, W) one-hot: the same numbers
            add = torch.full(centre.shape, cfg.identity_scale, dtype=logits.dtype, device=logits.device)
            logits = logits.scatter_add(1, centre.long()[:, None], add[:, None])
        return logits
