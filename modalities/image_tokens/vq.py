"""A small VQ-VAE image tokenizer: a strided conv encoder, a nearest-neighbour codebook and a
transposed-conv decoder. An H×W picture becomes an (H/f)×(W/f) grid of code indices, f = 2**downsamples.

Why our own and not transformers' JanusVQVAE: Janus's VQ needs GroupNorm widths that are multiples of 32
and a ResNet per level; at 32 px it trains at about 1.3 s per batch of 16 on 2 CPU cores, too slow for a
toy built in minutes. This one trains in seconds and is saved and loaded like any transformers model.

Training: straight-through estimator, loss = MSE(x̂, x) + ‖sg(z) − e‖² + β‖z − sg(e)‖², and codes no
encoder output chose for a while are moved onto random encoder outputs (dead-code restart).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel


class VQConfig(PretrainedConfig):
    model_type = "mmopd_vq"

    def __init__(self, image_size: int = 16, channels: int = 32, downsamples: int = 2, codebook_size: int = 64,
                 code_dim: int = 8, commitment: float = 0.25, **kwargs):
        self.image_size = image_size
        self.channels = channels
        self.downsamples = downsamples
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.commitment = commitment
        super().__init__(**kwargs)

    @property
    def grid(self) -> int:
        """Codes per side of the latent grid."""
        return self.image_size // 2 ** self.downsamples


class VQModel(PreTrainedModel):
    config_class = VQConfig
    main_input_name = "pixel_values"

    def __init__(self, config: VQConfig):
        super().__init__(config)
        c, d = config.channels, config.code_dim
        down: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1), nn.ReLU()]
        for _ in range(config.downsamples):
            down += [nn.Conv2d(c, c, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU()]
        self.encoder = nn.Sequential(*down, nn.Conv2d(c, d, 1))
        up: list[nn.Module] = [nn.Conv2d(d, c, 3, padding=1), nn.ReLU()]
        for _ in range(config.downsamples):
            up += [nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(c, c, 4, stride=2, padding=1),
                   nn.ReLU()]
        self.decoder = nn.Sequential(*up, nn.Conv2d(c, 3, 3, padding=1))
        self.codebook = nn.Embedding(config.codebook_size, d)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Embedding):
            nn.init.uniform_(module.weight, -1.0 / module.num_embeddings, 1.0 / module.num_embeddings)

    def quantize(self, z: Tensor) -> Tensor:
        """Nearest code of each latent vector. [B, D, h, w] -> [B, h, w] indices"""
        flat = rearrange(z, "b d h w -> (b h w) d")
        distances = torch.cdist(flat, self.codebook.weight)  # [B*h*w, K]
        return rearrange(distances.argmin(-1), "(b h w) -> b h w", b=z.shape[0], h=z.shape[2])

    def embed(self, codes: Tensor) -> Tensor:
        """[B, h, w] -> [B, D, h, w]"""
        return rearrange(self.codebook(codes), "b h w d -> b d h w")

    @torch.no_grad()
    def encode(self, pixel_values: Tensor) -> Tensor:
        """Pictures [B, 3, H, W] in [-1, 1] -> code indices [B, h*w], row-major."""
        return rearrange(self.quantize(self.encoder(pixel_values)), "b h w -> b (h w)")

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Code indices [B, h*w] -> pictures [B, 3, H, W] in [-1, 1]."""
        grid = rearrange(codes, "b (h w) -> b h w", h=self.config.grid)
        return self.decoder(self.embed(grid)).clamp(-1, 1)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Training pass: the reconstruction [B, 3, H, W], the loss (scalar) and the codes [B, h, w]."""
        z = self.encoder(pixel_values)  # [B, D, h, w]
        codes = self.quantize(z)
        e = self.embed(codes)
        quantized = z + (e - z).detach()  # straight-through: the decoder's gradient reaches the encoder
        recon = self.decoder(quantized)
        codebook_loss = F.mse_loss(e, z.detach())
        commitment_loss = F.mse_loss(z, e.detach())
        loss = F.mse_loss(recon, pixel_values) + codebook_loss + self.config.commitment * commitment_loss
        return recon, loss, codes

    @torch.no_grad()
    def restart_dead_codes(self, z: Tensor, usage: Tensor) -> int:
        """Move codes with zero `usage` [K] onto random encoder outputs z [B, D, h, w]; return how many."""
        dead = (usage == 0).nonzero().flatten()
        if dead.numel():
            flat = rearrange(z, "b d h w -> (b h w) d")
            pick = torch.randint(flat.shape[0], (dead.numel(),), device=z.device)
            self.codebook.weight[dead] = flat[pick]
        return dead.numel()
