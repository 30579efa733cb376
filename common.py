"""
Shared machinery for the four method scripts (asfm.py, integration_flow.py,
consistency_func.py, scoreflow.py) and toy2d.py: networks, samplers, data, metrics and
training plumbing. The methods themselves (losses, sampling rules, recipes) live in their
scripts; what is here is generic, except the networks' optional inputs that one method needs
(a U-Net's cross-attention context for Integration Flow, the INR generator of CM-Func).

Sections, in order (each has a banner); 1-3 are what a method copied into another project
needs (a network, a sampler, EMA and the optimizer step), the rest is this repo's plumbing:
  1.  Networks: UNet (DDPM-style), DDPMpp (RF's DDPM++), DiT (adaLN-Zero), MLP for 2-D,
      FuncGenerator (INR image functions, built by consistency_func.py)
  2.  ODE samplers: Euler and Dormand-Prince RK45 (forward and backward in t), straightness
  3.  EMA (with warm-up) and the optimizer step (clipping, warmup)
  4.  Data: cifar10, celeba, digits, photos, image folders, 2-D toys, a user's points;
      resumable batches
  5a. FID Inception: the TF graph of the FID paper, as in pytorch-fid (imports torchvision
      only when built)
  5b. FID, Inception Score, precision and recall; 2-D distances
  5c. digits-FD, photos-FD: Frechet distances on small classifiers (no Inception needed)
  6.  Training plumbing: Run (device, bf16, TF32, DDP; logging and NaN guard; atomic
      checkpoints and exact resume), run-folder locks, memory checks
  7.  Samples, images and benchmarks: the one sampling interface, grids, sample export,
      evaluation per NFE, timing
  8.  CLI: the flags every script shares, presets, checkpoint configs, one-line errors

Conventions (all files): images are float in [-1, 1], NCHW; 2-D data is [N, 2]; x0 = noise
(or source), x1 = data; flows run from t = 0 (noise) to t = 1 (data).
Networks are called net(x, t, y=None, extra=None, context=None): t is a float tensor of
shape [B] (flow time in [0, 1], or a noise embedding such as 0.25 ln sigma); networks
multiply it by 1000 before their sin-cos embedding. y are class labels (index num_classes is
the null class used for classifier-free guidance); `extra` is concatenated to the input
channels and `context` (U-Net only) is cross-attended (Integration Flow's anchor, one or
the other).
"""
import argparse
import copy
import datetime
import math
import os
import socket
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
import functools
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class UserError(ValueError):
    """Bad input or a fault the user can fix; scripts print it as one line and exit."""


#################################################################################
#                                  1. Networks                                  #
#################################################################################

def timestep_embedding(t, dim, scale=1000.0, max_period=10000.0):
    """Sin-cos embedding of float t [B] -> [B, dim] (t is scaled by 1000 first, as in DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = scale * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class Conditioning(nn.Module):
    """t (and optional class label, num_classes = null class) -> embedding vector."""

    def __init__(self, freq_dim, dim, num_classes=0):
        super().__init__()
        self.freq_dim, self.num_classes = freq_dim, num_classes
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label = nn.Embedding(num_classes + 1, dim) if num_classes else None

    def forward(self, t, y=None):
        emb = self.mlp(timestep_embedding(t, self.freq_dim))
        if self.label is not None:
            if y is None:  # unconditional call: the null class
                y = torch.full((t.shape[0],), self.num_classes, device=t.device, dtype=torch.long)
            emb = emb + self.label(y)
        return emb


def _norm(c):
    """GroupNorm with 32 groups when possible, fewer for narrow tiny models."""
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0 and c // g >= min(4, c))
    return nn.GroupNorm(groups, c)


def zero_(module):
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv, time-embedding scale/shift (DDPM++), dropout, skip; output /sqrt(2)."""

    def __init__(self, cin, cout, emb_dim, dropout):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.drop = _norm(cout), nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return (self.skip(x) + h) / math.sqrt(2)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, residual, output /sqrt(2). `norm`
    builds the normalization (DDPM++/NCSN++'s AttnBlockpp is this block with its GroupNorm)."""

    def __init__(self, c, norm=None):
        super().__init__()
        self.norm, self.qkv, self.proj = (norm or _norm)(c), nn.Conv2d(c, 3 * c, 1), zero_(nn.Conv2d(c, c, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        return (x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))) / math.sqrt(2)


class CrossAttnBlock(nn.Module):
    """Single-head cross-attention from the H*W positions of x to context tokens: a 1x1 conv
    of a full-resolution context image (ctx_ch channels), flattened to tokens with NO position
    embedding, so the output does not depend on where in the image a context pixel sits
    (DDDM's SpatialTransformer anchor input). Residual, zero-init projection, output /sqrt(2)."""

    def __init__(self, c, ctx_ch):
        super().__init__()
        self.norm, self.q, self.proj = _norm(c), nn.Conv2d(c, c, 1), zero_(nn.Conv2d(c, c, 1))
        self.ctx, self.kv = nn.Conv2d(ctx_ch, c, 1), nn.Linear(c, 2 * c)

    def forward(self, x, context):
        B, C, H, W = x.shape
        q = self.q(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, C)
        k, v = self.kv(self.ctx(context).flatten(2).transpose(1, 2)).chunk(2, dim=2)  # (B, hw, C)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
        return (x + self.proj(h.transpose(1, 2).reshape(B, C, H, W))) / math.sqrt(2)


class UNet(nn.Module):
    """DDPM-style U-Net (not DDPM++: no BigGAN-style resampling). ch=128, ch_mult=(1,2,2,2),
    2 blocks, attention at 16: 38.3M params (the DDPM CIFAR-10 net, 35.7M, plus scale/shift
    time modulation; RF's DDPM++ has about 62M); ch=24, ch_mult=(1,2), 1 block, attention at
    8: a 0.43M-parameter CPU model. Two ways to give it a second image: extra_ch concatenates
    it to the input channels (forward(..., extra=)); context_ch adds a CrossAttnBlock to it
    after every self-attention block (forward(..., context=))."""

    def __init__(self, in_ch=3, out_ch=None, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                 attn_res=(16,), dropout=0.1, image_size=32, num_classes=0, extra_ch=0, context_ch=0):
        super().__init__()
        out_ch, emb = out_ch or in_ch, 4 * ch
        attn = lambda c: [AttnBlock(c)] + ([CrossAttnBlock(c, context_ch)] if context_ch else [])  # noqa: E731
        self.cond = Conditioning(ch, emb, num_classes)
        self.conv_in = nn.Conv2d(in_ch + extra_ch, ch, 3, padding=1)
        self.down, skips, c, res = nn.ModuleList(), [ch], ch, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(nn.ModuleList([ResBlock(c, ch * mult, emb, dropout)]
                                                + (attn(ch * mult) if res in attn_res else [])))
                c = ch * mult
                skips.append(c)
            if level < len(ch_mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(c, c, emb, dropout), AttnBlock(c), ResBlock(c, c, emb, dropout)])
        self.mid_xattn = CrossAttnBlock(c, context_ch) if context_ch else None
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(nn.ModuleList([ResBlock(c + skips.pop(), ch * mult, emb, dropout)]
                                              + (attn(ch * mult) if res in attn_res else [])))
                c = ch * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(c, c, 3, padding=1)))
                res *= 2
        self.out = nn.Sequential(_norm(c), nn.SiLU(), zero_(nn.Conv2d(c, out_ch, 3, padding=1)))

    def forward(self, x, t, y=None, extra=None, context=None):
        emb = self.cond(t, y)
        h = self.conv_in(x if extra is None else torch.cat([x, extra], dim=1))
        hs = [h]
        for layer in self.down:
            h = self._block(layer, h, emb, context)
            hs.append(h)
        h = self.mid[1](self.mid[0](h, emb))
        h = self.mid[2](h if self.mid_xattn is None else self.mid_xattn(h, context), emb)
        for layer in self.up:
            h = self._block(layer, torch.cat([h, hs.pop()], dim=1) if isinstance(layer, nn.ModuleList) else h,
                            emb, context)
        return self.out(h)

    @staticmethod
    def _block(layer, h, emb, context):
        if not isinstance(layer, nn.ModuleList):  # down- or up-sampling
            return layer(h)
        h = layer[0](h, emb)
        for attn in layer[1:]:
            h = attn(h, context) if isinstance(attn, CrossAttnBlock) else attn(h)
        return h


def _gn(c):
    return nn.GroupNorm(min(c // 4, 32), c, eps=1e-6)  # NCSN++'s GroupNorm


class BigGANBlock(nn.Module):
    """NCSN++ ResnetBlockBigGAN (fir=False, skip_rescale=True): GN-SiLU-[resample]-conv, + Dense(temb),
    GN-SiLU-dropout-conv (zero init), skip (1x1 conv when shape changes), output /sqrt(2)."""

    def __init__(self, cin, cout, emb_dim, dropout, up=False, down=False):
        super().__init__()
        self.up, self.down = up, down
        self.norm1, self.conv1 = _gn(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.drop = _gn(cout), nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if (cin != cout or up or down) else nn.Identity()

    def resample(self, x):
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return F.avg_pool2d(x, 2) if self.down else x

    def forward(self, x, emb):
        h = self.resample(F.silu(self.norm1(x)))
        h = self.conv1(h) + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return (self.skip(self.resample(x)) + h) / math.sqrt(2)


class DDPMpp(nn.Module):
    """DDPM++ as in NCSN++'s code with RF's CIFAR-10 config (Song et al. 2021; Liu et al. 2023):
    BigGAN-style residual resampling blocks (avg-pool down, nearest up, fir=False), additive
    time embedding, skip_rescale, GroupNorm(min(C/4, 32)), attention after every block at 16x16
    on the way down and once per level on the way up. ch=128, ch_mult=(1,2,2,2), 4 blocks,
    dropout 0.15: 61.8M parameters (the RF/score-SDE DDPM++ CIFAR-10 network, ~62M)."""

    def __init__(self, in_ch=3, out_ch=None, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4,
                 attn_res=(16,), dropout=0.15, image_size=32, num_classes=0, extra_ch=0):
        super().__init__()
        out_ch, emb = out_ch or in_ch, 4 * ch
        self.cond = Conditioning(ch, emb, num_classes)
        self.conv_in = nn.Conv2d(in_ch + extra_ch, ch, 3, padding=1)
        self.down, skips, c, res = nn.ModuleList(), [ch], ch, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(nn.ModuleList([BigGANBlock(c, ch * mult, emb, dropout)]
                                               + ([AttnBlock(ch * mult, _gn)] if res in attn_res else [])))
                c = ch * mult
                skips.append(c)
            if level < len(ch_mult) - 1:
                self.down.append(nn.ModuleList([BigGANBlock(c, c, emb, dropout, down=True)]))
                skips.append(c)
                res //= 2
        self.mid = nn.ModuleList([BigGANBlock(c, c, emb, dropout), AttnBlock(c, _gn),
                                  BigGANBlock(c, c, emb, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(BigGANBlock(c + skips.pop(), ch * mult, emb, dropout))
                c = ch * mult
            self.up.append(nn.ModuleList(blocks + ([AttnBlock(c, _gn)] if res in attn_res else [])))
            if level > 0:
                self.up.append(nn.ModuleList([BigGANBlock(c, c, emb, dropout, up=True)]))
                res *= 2
        self.out = nn.Sequential(_gn(c), nn.SiLU(), zero_(nn.Conv2d(c, out_ch, 3, padding=1)))

    def forward(self, x, t, y=None, extra=None):
        emb = self.cond(t, y)
        h = self.conv_in(x if extra is None else torch.cat([x, extra], dim=1))
        hs = [h]
        for layer in self.down:
            h = layer[0](h, emb)
            for attn in layer[1:]:
                h = attn(h)
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for layer in self.up:
            for m in layer:
                if isinstance(m, AttnBlock):
                    h = m(h)
                elif m.up:
                    h = m(h, emb)
                else:
                    h = m(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


def sincos_pos_embed_2d(dim, grid):
    """Fixed 2-D sin-cos position embedding for a grid x grid patch layout -> (grid*grid, dim)."""
    coords = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def emb(pos):
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([emb(yy), emb(xx)], dim=1).float()


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: the conditioning regresses shift/scale/gate (zero init)."""

    def __init__(self, dim, heads, dropout=0.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"),
                                 nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        self.ada = nn.Sequential(nn.SiLU(), zero_(nn.Linear(dim, 6 * dim)))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)
        B, N, D = x.shape
        q, k, v = self.qkv(modulate(self.norm1(x), shift1, scale1)).reshape(
            B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + gate1[:, None] * self.proj(h)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """DiT (Peebles & Xie 2023): patchify, sin-cos positions, adaLN-Zero blocks, zero-init
    final layer, unpatchify. width=384, depth=12, heads=6 is DiT-S."""

    def __init__(self, in_ch=3, out_ch=None, image_size=32, patch=2, width=384, depth=12,
                 heads=6, dropout=0.0, num_classes=0, extra_ch=0):
        super().__init__()
        if image_size % patch:
            raise UserError(f"image size {image_size} is not divisible by patch size {patch}")
        self.out_ch, self.patch, self.grid = out_ch or in_ch, patch, image_size // patch
        self.embed = nn.Conv2d(in_ch + extra_ch, width, patch, stride=patch)
        self.register_buffer("pos", sincos_pos_embed_2d(width, self.grid)[None], persistent=False)
        self.cond = Conditioning(256, width, num_classes)
        self.blocks = nn.ModuleList([DiTBlock(width, heads, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), zero_(nn.Linear(width, 2 * width)))
        self.final = zero_(nn.Linear(width, patch * patch * self.out_ch))

    def forward(self, x, t, y=None, extra=None):
        x = x if extra is None else torch.cat([x, extra], dim=1)
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos  # (B, C, H, W) -> (B, N, D)
        c = self.cond(t, y)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada(c).chunk(2, dim=1)
        h = self.final(modulate(self.norm(h), shift, scale))  # (B, N, p*p*C)
        B, g, p = h.shape[0], self.grid, self.patch
        h = h.reshape(B, g, g, p, p, self.out_ch).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(B, self.out_ch, g * p, g * p)  # (B, N, p*p*C) -> (B, C, H, W)


class MLP(nn.Module):
    """Time-conditioned MLP for 2-D data: [x, extra, emb(t, y)] -> `depth` SiLU layers -> dim."""

    def __init__(self, dim=2, width=256, depth=3, num_classes=0, extra_dim=0, dropout=0.0):
        super().__init__()
        self.cond = Conditioning(64, width, num_classes)
        layers, c = [], dim + extra_dim + width
        for _ in range(depth):
            layers += [nn.Linear(c, width), nn.SiLU(), nn.Dropout(dropout)]
            c = width
        self.net = nn.Sequential(*layers, nn.Linear(width, dim))

    def forward(self, x, t, y=None, extra=None):
        parts = [x] + ([] if extra is None else [extra]) + [self.cond(t, y)]
        return self.net(torch.cat(parts, dim=1))


def build_net(args, shape, num_classes=0, extra_ch=0, out_ch=None, context_ch=0):
    """The network named by --arch for data of `shape` ((2,) or (C, H, W)); context_ch > 0
    (a cross-attended context image) exists for the U-Net only."""
    if context_ch and args.arch != "unet":
        raise UserError(f"cross-attention context is implemented for --arch unet only, not '{args.arch}'")
    if args.arch == "mlp":
        return MLP(shape[0], args.width, args.depth, num_classes, extra_ch, args.dropout)
    C, H, W = shape
    if args.arch == "unet":
        attn = tuple(r for r in args.attn_res)
        return UNet(C, out_ch, args.width, tuple(args.ch_mult), args.depth, attn, args.dropout,
                    H, num_classes, extra_ch, context_ch)
    if args.arch == "ddpmpp":
        return DDPMpp(C, out_ch, args.width, tuple(args.ch_mult), args.depth, tuple(args.attn_res),
                      args.dropout, H, num_classes, extra_ch)
    if args.arch == "dit":
        return DiT(C, out_ch, H, args.patch, args.width, args.depth, args.heads, args.dropout,
                   num_classes, extra_ch)
    raise UserError(f"--arch {args.arch}: build_net makes {', '.join(ARCHS[:-1])} (consistency_func.py "
                    "builds its FuncGenerator itself)")


def count_params(net):
    return sum(p.numel() for p in net.parameters())


# ---- INR generator (--arch func): DiT features -> a coordinate function (CM-Func) ----
def pixel_grid(size, device=None, batch=None, jitter=False):
    """Pixel-centre coordinates of an H x W image on [-1, 1]^2: centres -1 + (2j + 1)/s, as
    (y, x) pairs, shape (H, W, 2). jitter=True gives ANR's "variational coordinates": each
    sample's grid moved by Gaussian noise of std 0.3/s clipped to +-0.5/s -> (batch, H, W, 2)."""
    H, W = (size, size) if isinstance(size, int) else tuple(size)
    axes = [-1 + (2 * torch.arange(s, device=device, dtype=torch.float32) + 1) / s for s in (H, W)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    if not jitter:
        return grid
    half = 0.5 / torch.tensor([H, W], device=device, dtype=torch.float32)
    noise = 0.6 * half * torch.randn(batch, H, W, 2, device=device)  # std 0.3/s
    return grid + torch.maximum(torch.minimum(noise, half), -half)


def sample_at(img, coords):
    """The bilinear interpolant of img (B, C, H, W) at (y, x) coords ((H', W', 2) or
    (B, H', W', 2)) on [-1, 1]^2 -> (B, C, H', W'). Pixel centres (pixel_grid) hit the pixels;
    outside the outer centres the border value is held."""
    if coords.ndim == 3:
        coords = coords.expand(img.shape[0], *coords.shape)
    return F.grid_sample(img, coords.flip(-1).to(img.dtype), mode="bilinear",
                         padding_mode="border", align_corners=False)


class FuncGenerator(nn.Module):
    """CM-Func's generator: noisy image -> image *function*, rendered at any resolution.
    [reconstructed] (the paper's generator is not public). A DiT on the patches of x (adaLN-Zero
    blocks conditioned on the noise embedding t, scaled by 1000 inside it like every network
    here) extracts features; a head turns them into a function of continuous coordinates c in
    [-1, 1]^2, a ReLU MLP of `inr_depth` layers evaluated on all pixels of a grid at once:

    - head="tokens" (Trans-INR, Chen & Wang 2022): learned weight tokens appended to the patch
      sequence; after the blocks, the g tokens of layer l each give one row-scale vector of
      length fan_in that modulates the shared base weight of that layer (column j uses token
      j mod g), then every column is normalized to unit length; biases are the shared base
      biases. Input at c: Fourier features cos/sin(pi w c) (w geometric in [1, image_size/2],
      the training grid's Nyquist rate), plus with local=True (LIIF-style) the patch tokens
      unpatchified to a `feat`-channel map read bilinearly at c;
    - head="patch" (the default; LIIF's local ensemble, Chen et al. 2021): each patch token
      gives a code of `feat` numbers; at c the shared MLP reads the code of each of the 4
      nearest patch centres v with Fourier features of c - v, and the 4 outputs are blended
      with bilinear weights, so the patch functions join into one continuous function. Last
      layer zero-init, like the DiT's, so F = 0 at the start;
    - raw=True (either head) also feeds the noisy input x itself, read bilinearly at c: a direct
      path for the input noise to the output, off by default (README, CM-Func's generator study).
      Checkpoints written before the variants existed hold head="tokens", raw=True.

    forward(x, t, coords=None) renders on coords (default: x's pixel-centre grid), so the
    network plugs into code written for U-Net/DiT; `functions = generate(x, t)` once, then
    `render(functions, size)` at as many sizes as you like. The grid (and its training-time
    jitter) is chosen by the caller, which evaluates consistency_func's skip term c_skip x on
    the same coordinates with the same interpolant.
    """

    def __init__(self, in_ch=3, image_size=32, patch=2, width=384, depth=12, heads=6, dropout=0.0,
                 num_classes=0, inr_width=64, inr_depth=3, groups=None, fourier=16, max_freq=None,
                 jitter=True, feat=16, head="patch", raw=False, local=True):
        super().__init__()
        if image_size % patch:
            raise UserError(f"image size {image_size} is not divisible by patch size {patch}")
        groups = groups or max(1, inr_width // 4)
        if head not in ("tokens", "patch"):
            raise UserError(f"--inr-head {head}: use tokens or patch")
        if inr_depth < 2 or (head == "tokens" and inr_width % groups):  # the patch head has no tokens
            raise UserError("--inr-depth must be >= 2" + (f" and --inr-width ({inr_width}) a multiple of "
                            f"the {groups} weight-token groups" if head == "tokens" else ""))
        self.out_ch, self.image_size, self.jitter, self.head = in_ch, image_size, jitter, head
        self.patch, self.grid, self.feat, self.raw = patch, image_size // patch, feat, raw
        self.local_read = local and head == "tokens"  # the patch head is local by construction
        self.embed = nn.Conv2d(in_ch, width, patch, stride=patch)
        self.register_buffer("pos", sincos_pos_embed_2d(width, self.grid)[None], persistent=False)
        self.cond = Conditioning(256, width, num_classes)
        self.blocks = nn.ModuleList([DiTBlock(width, heads, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), zero_(nn.Linear(width, 2 * width)))
        max_freq = max_freq or image_size / 2  # the Fourier frequencies (fixed)
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(max_freq), fourier)),
                             persistent=False)
        dims = [4 * fourier + (in_ch if raw else 0)] + [inr_width] * (inr_depth - 1) + [in_ch]
        if head == "patch":
            dims[0] += feat
            self.code = nn.Linear(width, feat)  # patch token -> its function's code
            self.mlp = nn.ModuleList([nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])])
            zero_(self.mlp[-1])
            return
        dims[0] += feat if self.local_read else 0
        if self.local_read:
            self.local = nn.Linear(width, patch * patch * feat)  # patch token -> p x p feature pixels
        self.base, self.post, self.ranges, n = nn.ParameterList(), nn.ModuleList(), [], 0
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):  # (fan_in + 1 bias row, fan_out)
            layer = nn.Linear(fan_in, fan_out)  # PyTorch's default init for the shared base
            self.base.append(nn.Parameter(torch.cat([layer.weight.T, layer.bias[None]]).detach()))
            self.post.append(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, fan_in)))
            g = min(groups, fan_out)
            self.ranges.append((n, n + g))
            n += g
        self.tokens = nn.Parameter(torch.randn(1, n, width) * 0.02)

    def generate(self, x, t, y=None):
        """(B, C, H, W) at the training resolution, t [B] -> the B functions, a dict: "raw" (x
        or None); tokens head: "weights", one (B, fan_in + 1, fan_out) tensor per INR layer
        (last row = bias), and "map" (B, feat, H, W) or None; patch head: "codes" (B, feat, g, g)."""
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise UserError(f"the function generator was built for {self.image_size}px inputs, "
                            f"got {tuple(x.shape[-2:])}; render other sizes with net.render")
        B, g, p = x.shape[0], self.grid, self.patch
        T = self.tokens.shape[1] if self.head == "tokens" else 0
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos  # (B, C, H, W) -> (B, N, D)
        if T:
            h = torch.cat([h, self.tokens.expand(B, -1, -1)], dim=1)  # + weight tokens (B, N + T, D)
        c = self.cond(t, y)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada(c).chunk(2, dim=1)
        h = modulate(self.norm(h), shift, scale)
        out = {"raw": x if self.raw else None}
        if self.head == "patch":
            out["codes"] = self.code(h).transpose(1, 2).reshape(B, self.feat, g, g)
            return out
        tokens, h = h[:, -T:], h[:, :-T]  # (B, T, D), (B, N, D)
        out["map"] = None
        if self.local_read:
            m = self.local(h).reshape(B, g, g, p, p, self.feat).permute(0, 5, 1, 3, 2, 4)
            out["map"] = m.reshape(B, self.feat, g * p, g * p)
        out["weights"] = []
        for base, post, (lo, hi) in zip(self.base, self.post, self.ranges):
            rows = post(tokens[:, lo:hi]).transpose(1, 2)  # (B, fan_in, g)
            w = base[:-1] * rows.repeat(1, 1, base.shape[1] // (hi - lo))
            w = F.normalize(w, dim=1)  # unit-length columns (Trans-INR)
            out["weights"].append(torch.cat([w, base[-1:].expand(B, 1, -1).to(w.dtype)], dim=1))
        return out

    def _fourier(self, c):  # (B, H, W, 2) coordinates -> (B, H*W, 4 * fourier)
        angles = math.pi * c[..., None] * self.freqs
        return torch.cat([angles.cos(), angles.sin()], dim=-1).flatten(3).flatten(1, 2)

    def render(self, functions, size=None, coords=None):
        """Evaluate the functions on the pixel-centre grid of `size` (int or (H, W); default the
        training size) or on given coords ((H, W, 2) shared or (B, H, W, 2)) -> (B, C, H, W)."""
        some = functions["codes"] if self.head == "patch" else functions["weights"][0]
        B = some.shape[0]  # the number of functions
        if coords is None:
            coords = pixel_grid(size or self.image_size, some.device)
        coords = coords.expand(B, *coords.shape[-3:])
        H, W = coords.shape[1:3]
        maps = [functions.get("map"), functions["raw"]]  # the local reads at c: feature map, then x
        reads = [sample_at(m, coords).flatten(2).transpose(1, 2) for m in maps if m is not None]
        if self.head == "tokens":
            h, weights = torch.cat([self._fourier(coords)] + reads, dim=-1), functions["weights"]
            for i, wb in enumerate(weights):  # (B, HW, fan_in) -> (B, HW, fan_out)
                h = torch.matmul(h.to(wb.dtype), wb[:, :-1]) + wb[:, -1:]
                h = F.relu(h) if i < len(weights) - 1 else h
            return h.transpose(1, 2).reshape(B, self.out_ch, H, W)
        codes, g = functions["codes"].flatten(2).transpose(1, 2), self.grid  # (B, g*g, feat)
        u = (coords + 1) * g / 2 - 0.5  # in patch units: patch centres at 0, 1, ..., g - 1
        lo, out = u.floor(), 0
        for corner in ([0, 0], [0, 1], [1, 0], [1, 1]):  # the 4 nearest patch centres
            v = (lo + u.new_tensor(corner)).clamp(0, g - 1)
            weight = (1 - (u - lo - u.new_tensor(corner)).abs()).prod(-1).reshape(B, H * W, 1)
            idx = (v[..., 0] * g + v[..., 1]).long().reshape(B, H * W, 1)
            h = torch.cat([codes.gather(1, idx.expand(-1, -1, codes.shape[-1])),
                           self._fourier((u - v) * 2 / g)] + reads, dim=-1)  # c - v in image units
            for i, layer in enumerate(self.mlp):
                h = layer(h.to(layer.weight.dtype))
                h = F.relu(h) if i < len(self.mlp) - 1 else h
            out = out + weight * h  # bilinear weights: the 4 patch functions join continuously
        return out.transpose(1, 2).reshape(B, self.out_ch, H, W)

    def forward(self, x, t, y=None, extra=None, coords=None):
        """The rendered image F(x, t) on coords (default: x's pixel-centre grid, no jitter)."""
        if extra is not None:
            raise UserError("--arch func takes no extra input channels; use --arch unet or dit")
        return self.render(self.generate(x, t, y), x.shape[-2:] if coords is None else None, coords)


#################################################################################
#                                2. ODE samplers                                #
#################################################################################

MAX_NFE = 10_000  # sampling steps, anchor iterations, RK45 evaluations


@torch.no_grad()
def integrate(v, x, nfe=None, method="euler", t0=0.0, t1=1.0, rtol=1e-5, atol=1e-5,
              return_traj=False, max_nfe=MAX_NFE):
    """Solve dx/dt = v(x, t) from t0 to t1 (t1 < t0 integrates backwards, e.g. for inversion).

    v(x, t) receives t as a float tensor [B]. method: 'euler' (nfe steps, NFE = nfe) or 'rk45'
    (adaptive Dormand-Prince, rtol/atol; nfe unused).
    Returns (x_t1, info) with info = {'nfe': evaluations used, 'traj': [x at each step] or None}.
    A NaN/inf result (a diverged checkpoint) or an RK45 run past max_nfe evaluations (a field
    too stiff for it) stops with a one-line error instead of writing NaN or hanging.
    """
    ones = torch.ones(x.shape[0], device=x.device)
    traj = [x] if return_traj else None
    if method == "euler":
        if not nfe or nfe <= 0:
            raise UserError(f"{method} needs a positive number of steps (got {nfe})")
        ts = torch.linspace(t0, t1, nfe + 1).tolist()
        for ta, tb in zip(ts[:-1], ts[1:]):
            x = x + (tb - ta) * v(x, ta * ones)
            if return_traj:
                traj.append(x)
        _check_ode_finite(x, method)
        return x, {"nfe": nfe, "traj": traj}
    if method == "rk45":
        return _dopri5(v, x, t0, t1, rtol, atol, ones, traj, max_nfe)
    raise UserError(f"unknown sampler '{method}': use euler or rk45")


# Dormand-Prince 5(4) tableau: the 5th-order solution propagates, the 4th-order one
# estimates the local error (the same pair as scipy's RK45, which rectified flow uses).
_DP_C = [0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1]
_DP_A = [[], [1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
         [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
         [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
         [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]]
_DP_E = [71 / 57600, 0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40]  # b5 - b4


def _check_ode_finite(x, method, t=None):
    if not torch.isfinite(x).all():
        where = f" at t = {t:.4g}" if t is not None else ""
        raise UserError(f"{method}: the network's velocity is NaN/inf{where}; the checkpoint has "
                        "probably diverged: sample from an earlier checkpoint or retrain")


def _dopri5(v, x, t0, t1, rtol, atol, ones, traj, max_nfe):
    direction, t, nfe = (1.0 if t1 >= t0 else -1.0), t0, 1
    k1 = v(x, t * ones)
    _check_ode_finite(k1, "rk45", t)
    h = direction * min(0.01, abs(t1 - t0))
    while direction * (t1 - t) > 1e-12:
        if nfe + 6 > max_nfe:
            raise UserError(f"rk45 used {nfe} evaluations and reached only t = {t:.4g} of {t1}: "
                            "the flow is too stiff for it (or diverged); use Euler (--nfe N)")
        h = direction * min(abs(h), abs(t1 - t))
        ks = [k1]
        for i in range(1, 7):
            xi = x + h * sum(a * k for a, k in zip(_DP_A[i], ks) if a)
            ks.append(v(xi, (t + _DP_C[i] * h) * ones))
        nfe += 6
        x_new = xi  # the 7th stage point is the 5th-order solution (FSAL)
        err = h * sum(e * k for e, k in zip(_DP_E, ks) if e)
        scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
        err_norm = (err / scale).pow(2).mean().sqrt().item()
        if not math.isfinite(err_norm):
            _check_ode_finite(x_new, "rk45", t)  # NaN stages; else the error overflowed
            err_norm = 1e10
        if err_norm <= 1.0:
            t, x, k1 = t + h, x_new, ks[6]
            if traj is not None:
                traj.append(x)
        h = h * min(10.0, max(0.2, 0.9 * (err_norm + 1e-12) ** -0.2))
    return x, {"nfe": nfe, "traj": traj}


@torch.no_grad()
def straightness(v, x0, steps=100):
    """Straightness S (RF paper, Eq. 3) on the simulated flow: mean over Euler steps of
    ||(Z1 - Z0) - v(Z_t, t)||^2 (squared norm summed over dimensions, averaged over samples)."""
    x, vs = x0, []
    for t in torch.linspace(0, 1, steps + 1)[:-1].tolist():
        vs.append(v(x, torch.full((x.shape[0],), t, device=x.device)))
        x = x + vs[-1] / steps
    return sum(((x - x0) - vi).flatten(1).pow(2).sum(1).mean() for vi in vs).item() / steps


#################################################################################
#                         3. EMA and the optimizer step                         #
#################################################################################

class EMA:
    """Exponential moving average of a network's weights, kept in a frozen copy that
    evaluation and sampling use (the training network is never swapped).

    Warm-up: update k (k = 0, 1, ... = the training step) uses decay_k = min(decay,
    (1 + k) / (10 + k)) (TensorFlow's ExponentialMovingAverage with num_updates). A fixed 0.999
    would keep (0.999)^1500 = 22% of the random initial weights after 1500 steps; with the
    warm-up the average covers roughly the last k/10 steps early on and `decay` later (from
    k = 9000 for 0.999, k = 90000 for 0.9999). The step comes from the loop, so resume is exact."""

    def __init__(self, net, decay):
        self.model = copy.deepcopy(net).eval().requires_grad_(False)
        self.decay = decay

    def decay_at(self, step):
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, net, step):
        ema_p, net_p = list(self.model.parameters()), list(net.parameters())
        # p_ema += (1 - decay_k)(p - p_ema)
        torch._foreach_lerp_(ema_p, net_p, 1.0 - self.decay_at(step))
        for b_ema, b in zip(self.model.buffers(), net.buffers()):
            b_ema.copy_(b)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, sd):
        self.model.load_state_dict(sd)


def optimize(opt, loss, net, args, step):
    """One update: linear warmup of the learning rate, backward, gradient clipping, step."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip)
    opt.step()


#################################################################################
#                                    4. Data                                    #
#################################################################################

def toy_sample(name, n, generator=None):
    """n points (float32 [n, 2], roughly in [-4, 4]) and class labels from a 2-D toy.

    Labels: mixture component (8gaussians, tri-*), arm (spirals), half (moons), ring
    (circles), square colour (checkerboard). tri-src / tri-tgt are the rectified-flow
    paper's data->data pair: three Gaussians on the left, three on the right.
    """
    g = generator
    rand = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    randn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if name == "8gaussians":
        y = torch.randint(0, 8, (n,), generator=g)
        angle = y.float() * (2 * math.pi / 8)
        x = 3.0 * torch.stack([angle.cos(), angle.sin()], 1) + 0.3 * randn(n, 2)
    elif name in ("tri-src", "tri-tgt"):
        y = torch.randint(0, 3, (n,), generator=g)
        side = -3.0 if name == "tri-src" else 3.0
        centres = torch.tensor([[side, 2.5], [side, 0.0], [side, -2.5]])
        x = centres[y] + 0.35 * randn(n, 2)
    elif name == "moons":
        y = torch.randint(0, 2, (n,), generator=g)
        a = math.pi * rand(n)
        upper = torch.stack([a.cos(), a.sin()], 1)
        lower = torch.stack([1 - a.cos(), 0.5 - a.sin()], 1)
        x = torch.where(y[:, None] == 0, upper, lower)
        x = 2.0 * (x - torch.tensor([0.5, 0.25])) + 0.1 * randn(n, 2)
    elif name == "checkerboard":  # 4x4 board of 2x2 squares, alternate squares filled
        x1 = 4 * rand(n) - 2
        y = torch.randint(0, 2, (n,), generator=g)
        x2 = rand(n) - 2.0 * y + torch.floor(x1) % 2
        x = 2.0 * torch.stack([x1, x2], 1)
    elif name == "spirals":
        y = torch.randint(0, 2, (n,), generator=g)
        r = rand(n).sqrt() * 3.5
        angle = 2.5 * r + math.pi * y.float()
        x = torch.stack([r * angle.cos(), r * angle.sin()], 1) + 0.1 * randn(n, 2)
    elif name == "circles":
        y = torch.randint(0, 2, (n,), generator=g)
        angle = 2 * math.pi * rand(n)
        r = 1.5 + 1.5 * y.float()
        x = r[:, None] * torch.stack([angle.cos(), angle.sin()], 1) + 0.1 * randn(n, 2)
    else:
        raise UserError(f"unknown 2-D distribution '{name}': choose one of "
                        f"{', '.join(TOY_DATASETS[:-1])}")
    return x.float(), y


class IndexedDataset(torch.utils.data.Dataset):
    """Wraps a dataset so that items are (x, y, index), index being the global dataset index."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return x, (y if isinstance(y, int) else -1), i


@dataclass
class Data:
    """A training set: `dataset` yields (x, y, index); tensor-backed data keeps x, y in memory."""
    name: str
    shape: tuple
    num_classes: int
    dataset: torch.utils.data.Dataset = None
    x: torch.Tensor = None  # in-memory data (2-D toys, points)
    y: torch.Tensor = None

    @property
    def is_image(self):
        return len(self.shape) == 3

    def __len__(self):
        return len(self.x) if self.x is not None else len(self.dataset)

    def fresh(self, n, seed=12345):
        """Reference samples for 2-D metrics: new draws from the toy (not the training set)."""
        if self.name in TOY_DATASETS[:-1]:
            return toy_sample(self.name, n, torch.Generator().manual_seed(seed))[0]
        g = torch.Generator().manual_seed(seed)
        return self.x[torch.randint(0, len(self.x), (n,), generator=g)]


def _image_transform(size, crop=None):
    import torchvision.transforms as T
    ops = ([T.CenterCrop(crop)] if crop else []) + [T.Resize(size, antialias=True),
                                                    T.CenterCrop(size)]
    return T.Compose(ops + [T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])  # [-1, 1]


class ImageFiles(torch.utils.data.Dataset):
    """A flat list of image files (label -1), loaded as RGB."""

    def __init__(self, files, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(_rgb(self.files[i])), -1


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def _image_folder(root, transform):
    """Images under `root`; labels from sub-folders when every image sits in one."""
    import torchvision
    if not os.path.isdir(root):
        what = "is a file, not a folder" if os.path.exists(root) else "does not exist"
        raise UserError(f"image folder '{root}' {what}: pass --data-dir with your images")
    subdirs = sorted(d.name for d in os.scandir(root) if d.is_dir())
    top = sorted(os.path.join(root, f) for f in os.listdir(root) if f.lower().endswith(IMAGE_EXTS))
    if subdirs and not top:
        try:
            ds = torchvision.datasets.ImageFolder(root, transform=transform,
                                                  loader=lambda p: _rgb(p))
            return ds, len(ds.classes)
        except FileNotFoundError:
            pass
    files = top or sorted(os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs
                          if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_EXTS)}) found in '{root}': "
                        "point --data-dir at a folder of images")
    return ImageFiles(files, transform), 0


def _rgb(path):
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I"):  # 16-bit grey: convert("RGB") would clip it at 255 (white)
                grey = (np.asarray(im, np.float64) / 257).round().clip(0, 255)
                im = Image.fromarray(grey.astype(np.uint8))
            elif im.mode == "F":
                raise UserError(f"'{path}' holds floating-point pixels: save it as an 8- or 16-bit image")
            return im.convert("RGB")
    except UserError:
        raise
    except (OSError, SyntaxError, ValueError) as e:  # corrupt, truncated, not an image
        raise UserError(f"cannot read image '{path}' ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:80]}): remove or replace the file") from None


def _points_npy(path):
    """The [N, 2] finite numbers of a .npy file for --dataset points, or a one-line error."""
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read {path} as a .npy array ({str(e).splitlines()[0][:80]}): "
                        "save it with numpy.save(path, points)") from None
    if x.dtype.kind not in "biuf":
        raise UserError(f"{path} holds {x.dtype} values, not numbers: save float [N, 2] points")
    if x.ndim != 2 or x.shape[1] != 2 or len(x) < 2:
        raise UserError(f"{path} has shape {x.shape}; --dataset points needs [N, 2] with N >= 2")
    if not np.isfinite(x).all():
        raise UserError(f"{path} has {int((~np.isfinite(x)).sum())} NaN/inf values: "
                        "remove those points")
    return x


def load_data(args, name=None, data_dir=None, train=True):
    """The training set named by --dataset (or `name`), as a Data."""
    name, root = name or args.dataset, data_dir or args.data_dir
    if name in TOY_DATASETS[:-1]:
        x, y = toy_sample(name, 20_000, torch.Generator().manual_seed(0))  # fixed training set
        ncls = {"8gaussians": 8, "tri-src": 3, "tri-tgt": 3}.get(name, 2)
        return Data(name, (2,), ncls, x=x, y=y)
    if name == "points":
        if not (os.path.isfile(root) and root.endswith(".npy")):
            raise UserError(f"--dataset points needs --data-dir FILE.npy (got '{root}')")
        x = torch.from_numpy(_points_npy(root)).float()
        return Data("points", (2,), 0, x=x, y=torch.zeros(len(x), dtype=torch.long))
    size = args.image_size
    if name in CLASSIFIER_FD:  # digits, photos: in memory
        x, y = CLASSIFIER_FD[name]["load"](size, train)
        return Data(name, tuple(x.shape[1:]), CLASSIFIER_FD[name]["classes"],
                    dataset=IndexedDataset(LabelledTensors(x, y)), x=x, y=y)
    import torchvision  # image files only (2-D runs, digits and photos never import it)
    if name == "cifar10":
        tf = _image_transform(size)
        try:
            ds = torchvision.datasets.CIFAR10(root, train=train, transform=tf, download=True)
        except Exception as e:  # noqa: BLE001 (network errors come in many types)
            raise UserError(f"CIFAR-10 is not in '{root}' and could not be downloaded "
                            f"({type(e).__name__}): put cifar-10-batches-py/ there") from None
        return Data(name, (3, size, size), 10, dataset=IndexedDataset(ds))
    if name == "celeba":
        # 178x218 aligned faces -> centre crop 140 -> resize (the usual CelebA-64 protocol)
        tf = _image_transform(size, crop=140)
        if os.path.isdir(os.path.join(root, "celeba", "img_align_celeba")):
            try:
                ds = torchvision.datasets.CelebA(root, split="train" if train else "test",
                                                 target_type=[], transform=tf, download=False)
                return Data(name, (3, size, size), 0, dataset=IndexedDataset(ds))  # no labels: y = -1
            except RuntimeError:
                pass  # annotation files missing: fall back to the plain image folder
        folder = os.path.join(root, "celeba", "img_align_celeba")
        folder = folder if os.path.isdir(folder) else root
        if not os.path.isdir(folder) or not any(f.lower().endswith(IMAGE_EXTS)
                                                for f in os.listdir(folder)):
            raise UserError(f"CelebA not found in '{root}': unzip img_align_celeba.zip into "
                            f"{root}/celeba/ (torchvision's Google Drive download often fails, "
                            "so we do not try)")
        ds, _ = _image_folder(folder, tf)
        return Data(name, (3, size, size), 0, dataset=IndexedDataset(ds))
    if name == "folder":
        ds, ncls = _image_folder(root, _image_transform(size))
        return Data(name, (3, size, size), ncls, dataset=IndexedDataset(ds))
    raise UserError(f"unknown dataset '{name}': choose one of {', '.join(IMAGE_DATASETS + TOY_DATASETS)}")


DIGITS_TRAIN = 1500  # of scikit-learn's 1797 digits; the other 297 are held out


def _digits(size, train=True):
    """scikit-learn's copy of the UCI handwritten digits (1797 8x8 images, ink 0..16, 10
    classes), scaled to [-1, 1] (background -1), bilinearly upsampled to size x size, 1 channel.
    A fixed permutation (seed 0) splits them into 1500 training and 297 held-out images."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("--dataset digits reads scikit-learn's bundled copy of the UCI digits: "
                        "pip install scikit-learn") from None
    if size is None or size < 8:
        raise UserError(f"--image-size {size}: digits are 8x8, use --image-size 8 or larger")
    d = load_digits()
    x = torch.from_numpy(d.images).float().div(16).mul(2).sub(1)[:, None]  # (1797, 1, 8, 8)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.from_numpy(d.target).long()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    keep = order[:DIGITS_TRAIN] if train else order[DIGITS_TRAIN:]
    return x[keep].clamp(-1, 1).contiguous(), y[keep].contiguous()


def _photos(size, train=True):
    """size x size RGB patches of scikit-learn's two bundled photographs (china.jpg and
    flower.jpg, 427x640, no download), in [-1, 1]. Each photo is cut into 2size x 2size blocks
    (13 x 20 at size 16); a block gives its four size x size patches and itself downsampled 2x
    (2x2 average), so detail of two scales. Label: photo x a 3x3 grid of regions (18 classes: a
    patch of sky, roof, trees or water; petals, leaves or background). A fixed permutation (seed
    0) holds out a fifth of the blocks whole (520 patches at size 16; 2080 train), so no held-out
    pixel is in the training set."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        raise UserError("--dataset photos reads scikit-learn's two bundled sample photographs: "
                        "pip install scikit-learn") from None
    photos = load_sample_images().images  # two (427, 640, 3) uint8
    if size is None or not 4 <= 2 * size <= min(min(p.shape[:2]) for p in photos):
        raise UserError(f"--image-size {size}: photos are 427x640, use --image-size 4 to 213")
    b, blocks, labels = 2 * size, [], []
    for k, photo in enumerate(photos):
        x = torch.from_numpy(np.array(photo)).permute(2, 0, 1).float().div(127.5).sub(1)
        rows, cols = x.shape[1] // b, x.shape[2] // b
        x = x[:, : rows * b, : cols * b].unfold(1, b, b).unfold(2, b, b)  # (3, rows, cols, b, b)
        blocks.append(x.permute(1, 2, 0, 3, 4).reshape(rows * cols, 3, b, b))
        row, col = torch.arange(rows).repeat_interleave(cols), torch.arange(cols).repeat(rows)
        labels.append(9 * k + 3 * (3 * row // rows) + 3 * col // cols)
    blocks, labels = torch.cat(blocks), torch.cat(labels)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))
    keep = order[len(blocks) // 5:] if train else order[: len(blocks) // 5]
    blocks, labels = blocks[keep], labels[keep]
    quads = blocks.unfold(2, size, size).unfold(3, size, size)  # (n, 3, 2, 2, size, size)
    quads = quads.permute(0, 2, 3, 1, 4, 5).reshape(len(blocks), 4, 3, size, size)
    x = torch.cat([quads, F.avg_pool2d(blocks, 2)[:, None]], 1).flatten(0, 1)  # 5 patches a block
    return x.clamp(-1, 1).contiguous(), labels.repeat_interleave(5).contiguous()


class LabelledTensors(torch.utils.data.Dataset):
    """In-memory images and integer labels as a Dataset of (x, int label)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class ResumableBatches:
    """Endless (x, y, index) batches for this rank, starting at any training step.

    Epoch e uses a DistributedSampler (shuffle, seed, drop_last) with set_epoch(e), so the
    order depends only on (seed, epoch, rank, world size); starting at step s skips the
    first s mod (batches per epoch) batches of that epoch without loading them, which is
    what makes --resume continue exactly. Tensor-backed data is indexed directly.
    """

    def __init__(self, data, batch_size, run, seed=0, start_step=0, workers=0):
        from torch.utils.data import DataLoader, DistributedSampler
        self.data, self.batch, self.run, self.workers = data, batch_size, run, workers
        self.sampler = DistributedSampler(range(len(data)), num_replicas=run.world, rank=run.rank,
                                          shuffle=True, seed=seed, drop_last=True)
        self.per_epoch = len(self.sampler) // batch_size
        if self.per_epoch == 0:
            raise UserError(f"the dataset has {len(data)} items, fewer than one batch of "
                            f"{batch_size} per rank: lower --batch-size")
        self.step, self.DataLoader = start_step, DataLoader

    @property
    def epoch(self):
        """Epoch of the next batch (Integration Flow's w = 1/(epoch + 1) reads this)."""
        return self.step // self.per_epoch

    def __iter__(self):
        while True:
            epoch, skip = divmod(self.step, self.per_epoch)
            self.sampler.set_epoch(epoch)
            idx = torch.tensor(list(self.sampler))[: self.per_epoch * self.batch]
            batches = idx.view(self.per_epoch, self.batch)[skip:]
            if self.data.x is not None:
                for b in batches:
                    self.step += 1
                    yield self._to_device(self.data.x[b], self.data.y[b], b)
            else:
                loader = self.DataLoader(self.data.dataset, batch_sampler=batches.tolist(),
                                         num_workers=self.workers,
                                         pin_memory=self.run.device.type == "cuda")
                for x, y, i in loader:
                    self.step += 1
                    yield self._to_device(x, y, i)

    def _to_device(self, x, y, i):
        dev = self.run.device
        x = x.to(dev, non_blocking=True)
        if self.run.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(dev, non_blocking=True), i.to(dev, non_blocking=True)


def random_hflip(x):
    """Flip each image left-right with probability 1/2 (on the device, from the torch RNG,
    so that resumed runs draw the same flips)."""
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(3), x)


def uint8_batches(data, batch_size=250, workers=2):
    """The whole training set as uint8 image batches (for FID reference statistics)."""
    loader = torch.utils.data.DataLoader(data.dataset, batch_size=batch_size, num_workers=workers)
    for x, _, _ in loader:
        yield to_uint8(x)


#################################################################################
#      5a. FID Inception (the TF graph of the FID paper, as in pytorch-fid)     #
#################################################################################

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS_NAME)

# torchvision's Inception blocks (same parameters) with TF's pooling in the pool branch:
# TF's average pool divides by the number of valid pixels, torchvision's also counts the padding.
_tf_avg_pool = partial(F.avg_pool2d, kernel_size=3, stride=1, padding=1, count_include_pad=False)
_tf_max_pool = partial(F.max_pool2d, kernel_size=3, stride=1, padding=1)


@functools.cache
def fid_inception_blocks():
    """(InceptionA, InceptionC, InceptionE) with TF's pooling. Built on first use, so that only
    FID imports torchvision's models (a 2-D run never imports torchvision at all)."""
    from torchvision.models.inception import InceptionA, InceptionC, InceptionE

    class FIDInceptionA(InceptionA):
        pool = staticmethod(_tf_avg_pool)

        def forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(self.pool(x))], 1)

    class FIDInceptionC(InceptionC):
        pool = staticmethod(_tf_avg_pool)

        def forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = x
            for i in range(1, 6):
                bd = getattr(self, f"branch7x7dbl_{i}")(bd)
            return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(self.pool(x))], 1)

    class FIDInceptionE(InceptionE):
        pool = staticmethod(_tf_avg_pool)

        def forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
            return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(self.pool(x))], 1)

    return FIDInceptionA, FIDInceptionC, FIDInceptionE


class FIDInception(nn.Module):
    """Inception-v3 as in TF's FID code (pytorch-fid, clean-fid legacy_pytorch mode).
    forward(x): x is (B, 3 or 1, H, W), float in [0, 1] or uint8 in [0, 255]; returns
    (pool_3 features (B, 2048), logits (B, 1008)). The logits are pool_3 @ W without the fc
    bias, as in the original Inception Score code (openai/improved-gan) and torch-fidelity's
    'logits_unbiased'. Parameter names are those of the pytorch-fid weight file."""

    def __init__(self):
        super().__init__()
        from torchvision.models import inception_v3
        FIDInceptionA, FIDInceptionC, FIDInceptionE = fid_inception_blocks()
        net = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
        net.Mixed_5b, net.Mixed_5c = FIDInceptionA(192, 32), FIDInceptionA(256, 64)
        net.Mixed_5d = FIDInceptionA(288, 64)
        net.Mixed_6b, net.Mixed_6c = FIDInceptionC(768, 128), FIDInceptionC(768, 160)
        net.Mixed_6d, net.Mixed_6e = FIDInceptionC(768, 160), FIDInceptionC(768, 192)
        net.Mixed_7b, net.Mixed_7c = FIDInceptionE(1280), FIDInceptionE(2048)
        # The TF graph max-pools in its last block (unlike the paper); features depend on it.
        net.Mixed_7c.pool = _tf_max_pool
        # Children at top level (in order) so that state_dict keys match the .pth file.
        for name, module in net.named_children():
            setattr(self, name, module)
        self.trunk = [n for n, _ in net.named_children() if n not in ("avgpool", "dropout", "fc")]

    def forward(self, x):
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        for name in self.trunk:
            x = getattr(self, name)(x)
        feats = x.mean((2, 3))
        return feats, feats @ self.fc.weight.T


def load_fid_inception(device, weights=None):
    """FIDInception in eval mode without gradients. weights: None downloads the pytorch-fid
    weights once into the torch hub cache; a path loads that file; 'random' (tests only)
    keeps the random init."""
    if weights is None:
        try:
            state = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu",
                                                       progress=False, weights_only=True)
        except OSError as e:  # URLError, HTTPError, timeouts: no usable network
            where = os.path.join(torch.hub.get_dir(), "checkpoints")
            why = f"{type(e).__name__}: {e}".replace("\n", " ")
            raise UserError(f"FID needs the Inception weights {FID_WEIGHTS_NAME}: download "
                               f"{FID_WEIGHTS_URL} into {where}/ (or pass --inception-weights "
                               f"PATH); the download failed ({why})") from e
    elif weights != "random":
        if not os.path.isfile(weights):
            raise UserError(f"--inception-weights {weights}: no such file; download "
                            f"{FID_WEIGHTS_URL} and pass its path")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"--inception-weights {weights}: cannot read it ({type(e).__name__}); "
                            f"pass the file {FID_WEIGHTS_NAME}") from None
    model = FIDInception()
    if weights != "random":
        load_state(model, state, "Inception network", weights)
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def inception_features(model, images, batch_size=200):
    """images: a uint8 tensor (N, 3, H, W) or an iterable of such batches.
    Returns (features (N, 2048), logits (N, 1008)) as float64 numpy arrays."""
    dev = next(model.parameters()).device
    feats, logits = [], []
    for batch in [images] if torch.is_tensor(images) else images:
        if batch.dtype != torch.uint8:  # catches [-1, 1] samples passed without to_uint8
            raise TypeError(f"inception_features wants uint8 images, got {batch.dtype}")
        for chunk in batch.split(batch_size):
            with torch.autocast(dev.type, enabled=False):  # full precision even inside autocast
                f, l = model(chunk.to(dev, non_blocking=True))
            feats.append(f.double().cpu())
            logits.append(l.double().cpu())
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def to_uint8(x):
    """Images in [-1, 1] -> uint8 [0, 255], the values a saved PNG would hold (samples are
    quantized like the real images before Inception sees them)."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


#################################################################################
#                 5b. FID, Inception Score, precision and recall                #
#################################################################################

def feature_stats(features):
    """Mean and covariance (float64) of features (N, D)."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr sqrt(s1 s2), in float64, without scipy."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes do not match: mu1 {mu1.shape}, "
                         f"mu2 {mu2.shape}, sigma1 {s1.shape}, sigma2 {s2.shape}")
    # With R = s1^(1/2) (symmetric PSD), s1 s2 = R (R s2) and M = (R s2) R = R s2 R: AB and BA
    # have the same eigenvalues, and M is symmetric PSD. So s1 s2 has real eigenvalues
    # lambda_i >= 0 and tr sqrt(s1 s2) = sum_i sqrt(lambda_i), which eigvalsh(M) gives stably
    # (scipy's sqrtm of the non-symmetric product can return complex noise instead).
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r @ s2 @ r
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _logsumexp(a, axis):
    m = a.max(axis, keepdims=True)
    return m + np.log(np.exp(a - m).sum(axis, keepdims=True))


def inception_score(logits, splits=10):
    """Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) on each of `splits`
    consecutive parts; returns (mean, std) over parts. The softmax runs over all 1008 outputs,
    as the original TF code does (1000 ImageNet classes plus 8 unused ones)."""
    logp = np.asarray(logits, np.float64)
    logp = logp - _logsumexp(logp, 1)  # log-softmax: no log(0) for confident predictions
    n, splits = len(logp), min(splits, len(logp))
    scores = []
    for i in range(splits):  # the original's part boundaries i * n // splits
        part = logp[i * n // splits:(i + 1) * n // splits]
        logpy = _logsumexp(part, 0) - np.log(len(part))
        scores.append(np.exp((np.exp(part) * (part - logpy)).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _knn_radii(x, k, batch):
    # kth value k + 1 because each point's nearest neighbour is itself, at distance 0.
    return torch.cat([torch.cdist(c, x).kthvalue(k + 1, dim=1).values for c in x.split(batch)])


def _coverage(points, centers, radii, batch):
    """Fraction of points inside at least one ball (centers[j], radii[j])."""
    inside = [(torch.cdist(c, centers) <= radii).any(1) for c in points.split(batch)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real_features, fake_features, k=3, batch=1024, device="cpu"):
    """Improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the
    union of balls reaching each point's k-th nearest neighbour in its own set. precision =
    fraction of fake points on the real manifold, recall = fraction of real points on the fake
    one. Distances in float64, `batch` rows at a time (10k x 10k fits in memory)."""
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float64, device=device)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float64, device=device)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision_recall needs more than k={k} points per set, "
                         f"got {len(real)} real and {len(fake)} fake")
    precision = _coverage(fake, real, _knn_radii(real, k, batch), batch)
    recall = _coverage(real, fake, _knn_radii(fake, k, batch), batch)
    return precision, recall


def reference_stats(name, images_uint8_iter_fn, model, cache_dir, max_features=10000):
    """Inception statistics of a whole training set, computed once and cached as
    cache_dir/fid_ref_{name}.npz (name says dataset and resolution, e.g. 'cifar10-32').
    images_uint8_iter_fn() yields uint8 batches. Returns {'mu', 'sigma', 'features', 'n'}:
    'features' is a fixed random subset of at most max_features rows for precision/recall."""
    path = os.path.join(cache_dir, f"fid_ref_{name}.npz")
    if not os.path.exists(path):
        feats, _ = inception_features(model, images_uint8_iter_fn())
        mu, sigma = feature_stats(feats)
        keep = np.sort(np.random.default_rng(0).permutation(len(feats))[:max_features])
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"  # same directory, so os.replace is atomic
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            # float32 loses nothing: the network computes the features in float32
            np.savez(f, mu=mu, sigma=sigma, features=feats[keep].astype(np.float32),
                     n=np.int64(len(feats)))
        os.replace(tmp, path)
    with np.load(path, allow_pickle=False) as f:
        return {key: f[key] for key in f.files}


def fid_report(model, fake_uint8, ref):
    """FID, IS and precision/recall of fake uint8 images (N, 3, H, W) against reference_stats."""
    feats, logits = inception_features(model, fake_uint8)
    mu, sigma = feature_stats(feats)
    is_mean, is_std = inception_score(logits)
    # k-NN radii grow as a set gets sparser, so compare sets of equal size; samples are
    # i.i.d. and ref['features'] is already a random subset, so leading rows are fair subsets.
    n = min(len(feats), len(ref["features"]))
    precision, recall = precision_recall(ref["features"][:n], feats[:n],
                                         device=next(model.parameters()).device)
    return {"fid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"]), "is": is_mean,
            "is_std": is_std, "precision": precision, "recall": recall, "n": len(feats)}


def sliced_wasserstein(a, b, n_proj=512, seed=0):
    """Sliced 2-Wasserstein distance between point sets [N, D] and [M, D] (subsampled to the
    smaller N): sqrt of the mean over random directions of the 1-D W2^2 between projections."""
    n = min(len(a), len(b))
    g = torch.Generator().manual_seed(seed)
    a = a[torch.randperm(len(a), generator=g)[:n]].double().cpu()
    b = b[torch.randperm(len(b), generator=g)[:n]].double().cpu()
    dirs = torch.randn(a.shape[1], n_proj, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = (a @ dirs).sort(0)[0], (b @ dirs).sort(0)[0]
    return (pa - pb).pow(2).mean().sqrt().item()


def energy_distance(a, b):
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (>= 0, zero iff equal distributions)."""
    a, b = a.double().cpu(), b.double().cpu()
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


def toy_metrics(samples, reference):
    """The one 2-D metric function every method and toy2d.py report."""
    return {"sw2": sliced_wasserstein(samples, reference), "energy": energy_distance(samples, reference)}


#################################################################################
#   5c. digits-FD and photos-FD: Frechet distances with no Inception download   #
#################################################################################

class FDClassifier(nn.Module):
    """A small CNN whose 64-d penultimate layer plays Inception's pool3; `degradations` > 0 adds
    a second head that names how a patch was degraded (photos: clean, blurred, noisy)."""

    def __init__(self, channels=1, classes=10, degradations=0):
        super().__init__()
        conv = lambda cin, cout: [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]  # noqa: E731
        self.features = nn.Sequential(*conv(channels, 32), *conv(32, 32), nn.MaxPool2d(2),
                                      *conv(32, 64), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                                      nn.Linear(64 * 16, 64), nn.ReLU())
        self.head = nn.Linear(64, classes)
        self.degradation = nn.Linear(64, degradations) if degradations else None

    def forward(self, x):
        return self.head(self.features(x))


def _blur(x, sigma):
    """Separable 5-tap Gaussian blur, reflect-padded."""
    k = torch.exp(-torch.arange(-2, 3, dtype=x.dtype) ** 2 / (2 * sigma**2))
    k = (k / k.sum()).repeat(x.shape[1], 1, 1, 1)  # (C, 1, 1, 5)
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="reflect"), k, groups=x.shape[1])
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode="reflect"), k.transpose(2, 3), groups=x.shape[1])


def degrade(x, kind, generator=None):
    """Per image: kind 0 clean, 1 / 2 Gaussian blur (sigma 0.6 / 1.2 pixels), 3 / 4 Gaussian
    noise (std 0.05 / 0.15): the photos classifier's second task."""
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    out = torch.stack([x, _blur(x, 0.6), _blur(x, 1.2), x + 0.05 * noise, x + 0.15 * noise])
    return out[kind, torch.arange(len(x))]


def train_fd_classifier(name, size, epochs=30, seed=0):
    """Adam on the training split with +-1 pixel shifts; its own RNG, so training it in the
    middle of a run changes none of the run's random draws. In float64, so that the cached
    classifier (the yardstick of every digits-FD) comes out the same on any CPU and thread count
    (float32 training drifts: floors 19.8 to 20.9 on the machines we tried). Photos add random
    flips and the degradation task: 4 in 10 patches blurred or noisy, named by a second head, so
    that the features see sharpness and not only content (trained on regions alone, they scored a
    3x3 box blur of the training patches at 1.1x the floor). Returns (net, held-out accuracy of
    the class head); the net is float32."""
    spec = CLASSIFIER_FD[name]
    x, y = spec["load"](size, train=True)
    x = x.double()
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FDClassifier(x.shape[1], spec["classes"], spec["degradations"]).double()
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        for _ in range(epochs):
            for b in torch.randperm(len(x), generator=g).split(50):
                dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
                xb = x[b].roll((dx, dy), (2, 3))
                if not spec["degradations"]:
                    loss = F.cross_entropy(net(xb), y[b])
                else:
                    xb = torch.where(torch.rand(len(b), 1, 1, 1, generator=g, dtype=x.dtype) < 0.5,
                                     xb.flip(3), xb)
                    kind = (torch.randint(0, 10, (len(b),), generator=g) - 5).clamp(min=0)
                    f = net.features(degrade(xb, kind, g))
                    loss = F.cross_entropy(net.head(f), y[b]) + F.cross_entropy(net.degradation(f), kind)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    xt, yt = spec["load"](size, train=False)
    net = net.float().eval()
    with torch.no_grad():
        acc = (net(xt).argmax(1) == yt).float().mean().item()
    return net, acc


class ClassifierFD:
    """digits-FD / photos-FD: the Frechet distance between FDClassifier features of samples and
    of the held-out split, plus the classifier's mean confidence (max softmax) on the samples and
    their class coverage (classes that get at least 1% of the samples). The classifier is
    trained once per dataset and image size and cached as cache_dir/<name>_classifier-<size>.pt.
    floor: the training split vs the held-out one (what a perfect model scores, up to sample
    size); ceiling: N(0, I) noise clipped to [-1, 1]."""

    def __init__(self, name, size, cache_dir, device="cpu"):
        spec = CLASSIFIER_FD[name]
        path = os.path.join(cache_dir, f"{name}_classifier-{size}.pt")
        # built before the cache is read, so that a run draws the same initial weights from the
        # global RNG whether the classifier is cached or trained now (in its own RNG)
        self.net = FDClassifier(spec["channels"], spec["classes"], spec["degradations"])
        state = load_checkpoint(path) if os.path.isfile(path) else {}
        if state.get("trained_in") == "float64":
            load_state(self.net, state["net"], f"{name} classifier", path)
            self.accuracy = state["accuracy"]
        else:  # none yet, or one cached by an older version (float32-trained, machine-dependent)
            self.net, self.accuracy = train_fd_classifier(name, size)
            save_atomic({"net": self.net.state_dict(), "accuracy": self.accuracy,
                         "trained_in": "float64"}, path)
        self.net = self.net.to(device).eval()
        self.name, self.size, self.device, self.cache_dir = name, size, device, cache_dir
        self.shape = (spec["channels"], size, size)
        self.ref = feature_stats(self.features(spec["load"](size, train=False)[0])[0])

    @torch.no_grad()
    def features(self, x):
        """Features and softmax of images in [-1, 1], quantized to 8 bits like a saved PNG."""
        x = to_uint8(x.float().cpu()).float().div(127.5).sub(1)
        f = torch.cat([self.net.features(b.to(self.device)).cpu() for b in x.split(500)])
        return f.double().numpy(), self.net.head(f.to(self.device)).softmax(1).cpu()

    def predict(self, x):
        return self.features(x)[1].argmax(1)

    def report(self, x, ref=None):
        """<name>_fd against the held-out split (or against the images `ref`), confidence,
        coverage."""
        if tuple(x.shape[1:]) != self.shape:
            raise UserError(f"{self.name}-FD needs (N, {', '.join(map(str, self.shape))}) images, "
                            f"got {tuple(x.shape)}")
        f, p = self.features(x)
        share = torch.bincount(p.argmax(1), minlength=p.shape[1]).double() / len(x)
        ref = self.ref if ref is None else feature_stats(self.features(ref)[0])
        return {f"{self.name}_fd": frechet_distance(*feature_stats(f), *ref),
                "confidence": p.max(1).values.mean().item(),
                "coverage": int((share >= 0.01).sum())}

    def floor_and_ceiling(self, n=1000):
        noise = torch.randn(n, *self.shape, generator=torch.Generator().manual_seed(0))
        train = CLASSIFIER_FD[self.name]["load"](self.size, train=True)[0]
        return self.report(train)[f"{self.name}_fd"], self.report(noise.clamp(-1, 1))[f"{self.name}_fd"]


# datasets scored by their own small classifier instead of Inception (both from scikit-learn)
CLASSIFIER_FD = {
    "digits": dict(load=_digits, channels=1, classes=10, degradations=0,
                   split=f"{DIGITS_TRAIN} train vs 297 held-out digits"),
    "photos": dict(load=_photos, channels=3, classes=18, degradations=5,
                   split="2080 train vs 520 held-out patches at size 16"),
}


#################################################################################
#                              6. Training plumbing                             #
#################################################################################

def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, then rename: a run killed mid-write
    leaves the previous file intact."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:  # disk full, killed by Ctrl-C, ...: no full-size leftovers
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


_READ = {}  # the checkpoint this command reads: (real path, mtime, size) -> its dict


def read_checkpoint(path):
    """load_checkpoint(path, mmap=True) once per command: sample/eval parse the flags, check the
    method and load the weights from one read (a file rewritten since is read again)."""
    stat = os.stat(path) if os.path.isfile(path) else None
    key = (os.path.realpath(path), stat and (stat.st_mtime_ns, stat.st_size))
    if key not in _READ:
        _READ.clear()
        _READ[key] = load_checkpoint(path, mmap=True)
    return _READ[key]


def load_checkpoint(path, device="cpu", mmap=False):
    """torch.load(weights_only=True) with one-line errors; mmap=True maps the tensors from the
    file instead of reading them (cheap to look at, e.g. a big checkpoint's config and step)."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at '{path}': train first or pass --ckpt PATH")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 (truncated zip, bad pickle, ...)
        raise UserError(f"cannot read checkpoint '{path}' ({type(e).__name__}): it is corrupt "
                        "or not one of ours; use an earlier checkpoint or retrain") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"'{path}' holds a {type(ckpt).__name__}, not one of our checkpoints "
                        "(a dict): pass a ckpt.pt written by these scripts")
    return ckpt


# config keys that decide a network's shape, named when a checkpoint does not fit
ARCH_KEYS = ("arch", "preset", "width", "depth", "image_size", "dataset", "anchor_input", "inr_width",
             "inr_depth", "inr_head", "raw_read", "local_read")


def load_state(obj, state, name, path, config=None):
    """obj.load_state_dict(state) with a one-line error that names the flags to match."""
    try:
        obj.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:160]
        flags = " ".join(f"--{k.replace('_', '-')} {config[k]}" for k in ARCH_KEYS
                         if config and config.get(k) is not None)
        raise UserError(f"checkpoint '{path}' does not fit this {name} ({first}); it was "
                        f"written with {flags or 'other settings'}: pass the same flags") from None


def load_weights(net, path, key="ema"):
    """Load the EMA (default) or online (key 'online' or 'net') weights of a checkpoint into
    net; returns the checkpoint."""
    key = "net" if key == "online" else key
    ckpt = read_checkpoint(path)  # load_state_dict copies the weights onto the net's device
    if key not in ckpt.get("state", {}):
        raise UserError(f"checkpoint '{path}' has no '{key}' weights")
    load_state(net, ckpt["state"][key], "network", path, ckpt.get("config"))
    return ckpt


def check_unchanged(args, config, path):
    """--resume continues the run a checkpoint holds: a flag saved in its config that now has
    another value (data, network, method, batch, lr, schedule: all but RESUME_FREE) is refused
    unless --allow-changed names it. Returns the allowed changes as text ('' if none)."""
    now, allowed = config_dict(args), set(flag_names(getattr(args, "allow_changed", "")))
    # a data folder counts where it is the data (folder, points), not a toy's or a download's
    paths = {"data_dir": config.get("dataset"), "source_dir": config.get("source")}
    free = RESUME_FREE | {k for k, data in paths.items() if data not in ("folder", "points")} | \
        getattr(args, "not_in_force", set())  # e.g. a 1-RF's ASFM flags, whose defaults may change
    changed = [k for k in config if k in now and k not in free and not _same(k, config[k], now[k])]
    refused = [k for k in changed if k not in allowed]
    if refused:
        names = ",".join(k.replace("_", "-") for k in refused)
        raise UserError(f"--resume: {path} was trained with {flag_text(config, refused)}, this run "
                        f"has {flag_text(now, refused)}: pass the same flags, or --allow-changed "
                        f"{names} to change them on purpose")
    return flag_text(now, changed)


def writable_folder(path, flag, default_of=None):
    """Create the folder if needed and check that files can be written there (one-line error).
    default_of: the flag whose default the folder is, when `flag` is not a flag but says where the
    folder came from (e.g. the checkpoint's folder, --out-dir's default in --mode sample)."""
    where = f"{flag} {path}" + (f" (the default {default_of})" if default_of else "")
    fix = f"pass {default_of} with" if default_of else "pass"
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{where} is a file, not a folder: {fix} a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"{where}: cannot write there ({e.strerror}); {fix} a folder you can "
                        "write to") from None


_LOCKS = {}  # run folder -> this process's open lock file


def lock_folder(folder):
    """Refuse a run folder that another live process trains in: an exclusive flock on
    <folder>/run.lock, which the OS drops when the holder exits, however it exits (a killed run
    leaves no stale lock). The file names the holder. A second Run of this process reuses the
    lock. Where there is no flock (Windows, some network file systems) it says so and goes on."""
    key = os.path.realpath(folder)
    if key in _LOCKS:
        return
    f = open(os.path.join(folder, "run.lock"), "a+")
    try:
        import fcntl  # Unix only
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"--out-dir {folder} is in use by a live run ({holder}): wait for it to "
                        "finish, stop it, or pass another --out-dir") from None
    except (ImportError, OSError) as e:
        print(f"note: --out-dir {folder} cannot be locked here ({getattr(e, 'strerror', None) or e}): "
              "make sure no other run trains into it", file=sys.stderr)
        f.close()
        return
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M')}\n")
    f.flush()
    _LOCKS[key] = f


def unlock_folder(folder):
    f = _LOCKS.pop(os.path.realpath(folder), None)
    if f is not None:
        f.close()  # closing the file releases the flock


def free_memory(device):
    """Bytes that can still be allocated on `device`: CUDA's free memory; on the CPU the kernel's
    MemAvailable, capped by a container's (cgroup v2 or v1) limit."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    for limit, usage in (("memory.max", "memory.current"),
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            with open(f"/sys/fs/cgroup/{limit}") as a, open(f"/sys/fs/cgroup/{usage}") as b:
                free = min(free, int(a.read()) - int(b.read()))
        except (OSError, ValueError):  # no such cgroup file, or "max" (no limit)
            pass
    return free


def check_fits(nbytes, device, what, fix):
    """One-line error when an estimate of the bytes something needs exceeds what `device` has."""
    free = free_memory(device)
    if nbytes > free:
        raise UserError(f"{what} needs about {nbytes / 1e9:,.3g} GB, but {device.type} has "
                        f"{free / 1e9:,.3g} GB free: {fix}")


def data_shape(args):
    """The shape of one example, known from the flags alone: (2,) or (C, H, W)."""
    if not args.is_image:
        return (2,)
    return (CLASSIFIER_FD.get(args.dataset, {}).get("channels", 3), args.image_size, args.image_size)


def estimate_params(args, shape):
    """The --arch network's parameter count without building it: built at depth 1 and 2 on the
    meta device (no memory) and extrapolated, as every network here grows linearly in depth
    (func: its DiT part)."""
    counts = []
    for depth in (1, 2):
        a = argparse.Namespace(**{**vars(args), "depth": depth,
                                  "arch": "dit" if args.arch == "func" else args.arch})
        with torch.device("meta"):
            counts.append(count_params(build_net(a, shape)))
    return counts[0] + (args.depth - 1) * (counts[1] - counts[0])


def duration(seconds):
    """Seconds -> 'h:mm:ss' (hours unbounded)."""
    h, rest = divmod(int(seconds), 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """Prints '<what>: done/total, h:mm:ss left' at most every `every` seconds, so that a long
    loop (sampling, toy2d.py's training) shows that it is alive and how long it will take."""
    every = 30.0

    def __init__(self, what, total, print_fn=print):
        self.what, self.total, self.print = what, total, print_fn
        self.start = self.last = time.time()

    def update(self, done):
        now = time.time()
        if 0 < done < self.total and now - self.last >= self.every:
            self.last = now
            self.print(f"{self.what}: {done}/{self.total}, "
                       f"{duration((now - self.start) / done * (self.total - done))} left")


class RunDevice:
    """Run, part 1: where this process computes (device, DDP rank, precision) and how the
    network is wrapped for training. Mirrors nanoGPT's train.py set-up."""

    def setup_device(self, args):
        """Device, DDP rank and world (torchrun), per-rank batch, TF32, training and
        evaluation precision."""
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        want_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if want_cuda and not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: no CUDA device here; use --device cpu")
        if self.ddp:
            import torch.distributed as dist
            self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
            self.device = torch.device(f"cuda:{self.local_rank}" if want_cuda else "cpu")
            if want_cuda:
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():  # long timeout: rank 0 may evaluate FID meanwhile
                dist.init_process_group("nccl" if want_cuda else "gloo",
                                        timeout=datetime.timedelta(hours=2))
        else:
            self.rank, self.world, self.local_rank = 0, 1, 0
            self.device = torch.device(args.device or ("cuda" if want_cuda else "cpu"))
        if args.batch_size % self.world:
            raise UserError(f"--batch-size {args.batch_size} is not divisible by the "
                            f"{self.world} processes")
        self.master = self.rank == 0
        self.local_batch = args.batch_size // self.world
        if self.device.type == "cuda":  # TF32 matmuls/convs: free speed on Ampere and newer
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        bf16 = args.amp == "bf16" or (args.amp == "auto" and self.device.type == "cuda")
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16
                         else nullcontext())
        self.eval_bf16 = getattr(args, "eval_amp", "fp32") == "bf16"
        self.eval_precision = ("bf16" + ("+tf32" if self.device.type == "cuda" else "")
                               if self.eval_bf16 else "fp32")  # printed with every number
        self.channels_last = bool(getattr(args, "channels_last", False) and args.is_image)

    def train_precision(self):
        """A fresh training-precision context (bf16 autocast or none), for use inside helpers."""
        return (torch.autocast(self.device.type, dtype=torch.bfloat16)
                if isinstance(self.autocast, torch.autocast) else nullcontext())

    @contextmanager
    def sampling(self):
        """Precision for evaluation, sample export and reflow pairs (--eval-amp): fp32 with TF32
        off (default), or bf16 autocast with TF32. Inside a training autocast block it switches
        that off; a fresh context each time, so it nests safely."""
        keep = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.eval_bf16
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.eval_bf16):
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = keep

    def wrap(self, net):
        """The module to train with: channels_last, DDP, torch.compile. Checkpoints are saved
        from the unwrapped `net`, so keys have no 'module.' or '_orig_mod.' prefix."""
        if self.channels_last:
            net.to(memory_format=torch.channels_last)
        if self.ddp:  # a 1x1 conv's weight grad differs from its bucket only in size-1 dims' strides
            warnings.filterwarnings("ignore", "Grad strides do not match bucket view strides")  # (harmless)
            from torch.nn.parallel import DistributedDataParallel as DDP
            net = DDP(net, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        return torch.compile(net) if self.args.compile else net

    def close(self):
        if self._watch is not None:
            self._watch.cancel()
        if self.master and self.args.mode == "train":
            unlock_folder(self.args.out_dir)
        if self.ddp and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class RunLog:
    """Run, part 2: the console and <out-dir>/log.txt (rank 0), steps/s, and the NaN/inf guard
    on the loss and on the weights before they are saved."""
    _watched = None  # the run whose first training step is being watched (watch_first_step)

    @staticmethod
    def due(step, every):
        return bool(every) and every > 0 and step % every == 0

    def print(self, *msg):
        if self.master:
            line = " ".join(str(m) for m in msg)
            print(line, flush=True)
            os.makedirs(self.args.out_dir, exist_ok=True)
            with open(os.path.join(self.args.out_dir, "log.txt"), "a") as f:
                f.write(line + "\n")

    def log(self, step, loss, **scalars):
        """Every step: fold loss into the NaN flag (no host sync). Every --log-every steps (and
        once early, see progress_due): check the flag and print loss, logged numbers, steps/s
        and ETA."""
        self._bad |= ~torch.isfinite(loss.detach()).all()
        if not self.progress_due(step):
            return
        self.check_finite(step)
        now, first = time.time(), self._mark[1] if step > self._mark[1] else 0  # 0: a phase's own count
        rate = (step - first) / max(now - self._mark[0], 1e-9)
        self._mark = (now, step)
        eta = (self.args.steps - step) / rate if rate > 0 else 0
        parts = [f"step {step}/{self.args.steps}", f"loss {loss.item():.4f}"]
        parts += [f"{k} {float(v):.4g}" for k, v in scalars.items()]
        parts += [f"{rate:.2f} steps/s", f"eta {duration(eta)}"]
        self.print(" | ".join(parts))

    def watch_first_step(self, start, total):
        """Called as the training loop starts at step `start` of `total`. A first step that takes
        minutes (a huge network, a slow device) would leave the console silent: a helper thread
        says so after Progress.every (30 s), once, and progress_due prints the step's time."""
        self._loop_start, self._first_line = time.time(), True
        if self.master and start < total:
            RunLog._watched = self  # a run in this process that stopped early (an error) stays quiet
            self._watch = threading.Timer(Progress.every, self._first_step_slow, (start + 1, total))
            self._watch.daemon = True
            self._watch.start()

    def _first_step_slow(self, step, total):
        if self._watch is not None and RunLog._watched is self:
            self._watch_fired = True
            self.print(f"step {step}/{total}: not done after {duration(Progress.every)} (a slow first step: "
                       "a large network or batch for this device); its time is printed when it ends")

    def progress_due(self, step, total=None):
        """Whether `step` (just done) gets a progress line: every --log-every steps, at the end
        (`total`, default --steps), and once early: the first step that ends 30 s (Progress.every)
        or more after the loop started without a progress line, so that a slow run shows that it
        is alive, and its speed, long before --log-every steps."""
        if self._watch is not None:  # the first step is done
            self._watch.cancel()
            self._watch = None
            if self._watch_fired:
                self.print(f"step {step} done, {duration(time.time() - self._loop_start)} after the "
                           "training loop started")
        total = self.args.steps if total is None else total
        due = (self.due(step, self.args.log_every) or step == total
               or (self._first_line and time.time() - self._loop_start >= Progress.every))
        if due:
            self._first_line = False
        return due

    def check_finite(self, step, what="loss"):
        if self._bad.item():
            fp32 = " or --amp fp32" if isinstance(self.autocast, torch.autocast) else ""  # bf16 may overflow
            if self.saved_step is not None:
                last = (f"the last good checkpoint is {self.ckpt_path} (step {self.saved_step}): --resume "
                        f"with a lower --lr and --allow-changed lr{fp32}")
            else:  # nothing to resume; an older run's ckpt.pt may still be there
                last = (f"no checkpoint of this run was written: train again with a lower --lr{fp32}"
                        + (" and --overwrite" if os.path.isfile(self.ckpt_path) else ""))
            raise UserError(f"{what} became NaN/inf before step {step}; stopped without saving, {last}")

    def check_weights(self, step, *states):
        """Before a checkpoint is written: every floating tensor in it (weights, EMA, optimizer
        state, memory) must be finite and below 1e18 in magnitude; the loss can be finite while
        the update just made the weights NaN or huge (a product of two numbers above 1e19
        overflows float32, so such weights give an inf loss on the next step). One host sync;
        under DDP the verdict is shared so that all ranks stop together."""
        flags = [torch.zeros((), dtype=torch.bool, device=self.device)]

        def walk(obj):
            if torch.is_tensor(obj):
                if obj.is_floating_point():
                    flags.append(~(obj.detach().abs() < 1e18).all().to(self.device))  # NaN fails too
            elif isinstance(obj, (dict, list, tuple)):
                for v in (obj.values() if isinstance(obj, dict) else obj):
                    walk(v)
        walk(states)
        bad = torch.stack(flags).any() | self._bad  # this rank's loss flag too
        if self.ddp:  # every rank stops, or none (a lone rank stopping would hang the others)
            bad = bad.float()
            torch.distributed.all_reduce(bad)
            bad = bad > 0
        self._bad = bad
        self.check_finite(step, "the weights (or the loss)")


class RunCheckpoints:
    """Run, part 3: atomic checkpoints, exact resume (RNGs re-seeded from (seed, step, rank)),
    and the run folder's rules (--resume continues, --overwrite starts over)."""

    @property
    def ckpt_path(self):
        return os.path.join(self.args.out_dir, "ckpt.pt")

    def check_run_folder(self, total_steps=None):
        """Training never silently overwrites another run's ckpt.pt: --resume continues it,
        --overwrite starts over. --resume needs a checkpoint of this method and stage, written
        with the same flags (check_unchanged) and at most total_steps (--steps) steps in.
        Returns the checkpoint to resume from, or None. Called by resume(), and early by
        asfm.py, whose reflow pairs and --init auto 1-RF come before its training loop."""
        args = self.args
        if not os.path.isfile(self.ckpt_path) or (getattr(args, "overwrite", False) and not args.resume):
            return None  # --overwrite starts over, whatever the file holds (even a corrupt one)
        try:
            ckpt = load_checkpoint(self.ckpt_path, mmap=True)  # resume() copies what it needs
        except UserError:  # a truncated or foreign file: nothing to continue
            raise UserError(f"cannot read checkpoint '{self.ckpt_path}': it is corrupt or not one of ours; "
                            "pass --overwrite to train from scratch over it, or another --out-dir") from None
        config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
        config = {**(self.old_defaults(config) if self.old_defaults else {}), **config}
        written_by = config.get("method", "an unknown method")
        if not args.resume:
            raise UserError(f"{args.out_dir} already holds a checkpoint ({written_by}, step "
                            f"{ckpt.get('step', '?')}): pass --resume to continue it, "
                            "--overwrite to start over, or another --out-dir")
        if written_by != args.method:
            raise UserError(f"{self.ckpt_path} was written by {written_by}, not {args.method}: "
                            "--resume needs a checkpoint of the same method (and stage); use "
                            "another --out-dir")
        self.changes = check_unchanged(args, config, self.ckpt_path)
        total = args.steps if total_steps is None else total_steps
        if ckpt["step"] > total:
            extra = f" (--steps {args.steps} plus pre-training)" if total != args.steps else ""
            raise UserError(f"{self.ckpt_path} is at step {ckpt['step']}, past the {total} steps "
                            f"this run asks for{extra}: --resume cannot undo steps; pass a larger "
                            "--steps to train longer, or --overwrite to start over")
        return ckpt

    def reseed(self, step):
        """Seed every RNG from (seed, step, rank) at each checkpoint: a resumed run draws
        exactly the noise the uninterrupted run drew, with no RNG state to store."""
        torch.manual_seed((self.args.seed * 1_000_003 + step) * 4099 + self.rank)

    def save(self, step, local=None, **state):
        """Atomically write <out-dir>/ckpt.pt: objects with a state_dict (net, ema, opt)
        and plain tensors/numbers, the step and the config. `local` is per-rank state
        (e.g. ASFM's memory), written beside it as ckpt.rank<r>.pt under DDP."""
        ckpt = {"step": step, "config": config_dict(self.args),
                "state": {k: (v.state_dict() if hasattr(v, "state_dict") else v)
                          for k, v in state.items()}}
        self.check_weights(step, ckpt["state"], local)
        if local is not None and self.world > 1:
            save_atomic({"step": step, "local": local}, f"{self.ckpt_path}.rank{self.rank}")
        elif local is not None:
            ckpt["local"] = local
        if self.ddp:
            torch.distributed.barrier()  # rank files first, then the main file
        if self.master:
            save_atomic(ckpt, self.ckpt_path)
            self.saved_step = step
        if self.ddp:  # nobody goes on (or loads ckpt.pt) before rank 0 has written it
            torch.distributed.barrier()
        self.reseed(step)

    def resume(self, total_steps=None, **objects):
        """With --resume and a checkpoint in --out-dir: load every object's state and return
        (step, checkpoint dict, local state or None); otherwise (0, None, None). total_steps:
        the step the run ends at (default --steps)."""
        ckpt = self.check_run_folder(total_steps)
        if ckpt is None:
            if self.args.resume:
                self.print(f"no checkpoint at {self.ckpt_path}: starting from step 0")
            self.reseed(0)
            self._mark = (time.time(), 0)
            self.watch_first_step(0, self.args.steps if total_steps is None else total_steps)
            return 0, None, None
        for name, obj in objects.items():
            if name not in ckpt["state"]:
                raise UserError(f"checkpoint '{self.ckpt_path}' has no '{name}': it was written "
                                "by another method or stage; use another --out-dir")
            load_state(obj, ckpt["state"][name], name, self.ckpt_path, ckpt["config"])
        local = ckpt.get("local")
        if self.world > 1 and os.path.isfile(f"{self.ckpt_path}.rank{self.rank}"):
            rank_file = load_checkpoint(f"{self.ckpt_path}.rank{self.rank}", self.device)
            local = rank_file["local"] if rank_file["step"] == ckpt["step"] else None
        self.reseed(ckpt["step"])
        self.saved_step = ckpt["step"]
        self._mark = (time.time(), ckpt["step"])
        done = ckpt["step"] == (self.args.steps if total_steps is None else total_steps)
        self.print(f"resumed from {self.ckpt_path} at step {ckpt['step']}"
                   + (f" with {self.changes} (--allow-changed)" if self.changes else "")
                   + (": that is where --steps ends, so nothing is trained; pass a larger "
                      "--steps to train longer" if done else ""))
        self.watch_first_step(ckpt["step"], self.args.steps if total_steps is None else total_steps)
        return ckpt["step"], ckpt, local


class Run(RunDevice, RunLog, RunCheckpoints):
    """Where and how this process runs: device, DDP rank (torchrun), precision, run folder,
    logging, NaN guard, checkpoints (the three parts above). Every check of the run's inputs
    happens here, before any work."""

    def __init__(self, args, old_defaults=None):
        self.args, self.old_defaults = args, old_defaults  # old_defaults: as in parse_args
        self.setup_device(args)
        self._bad = torch.zeros((), dtype=torch.bool, device=self.device)
        self.saved_step = None  # step of the last checkpoint this run wrote or resumed from
        self.changes = ""  # the flags --allow-changed let --resume change, as text
        self._mark = (time.time(), 0)  # (time, step) of the last log line, for steps/s
        self._watch, self._watch_fired = None, False  # the first step's watcher (watch_first_step)
        self._loop_start, self._first_line = time.time(), False  # no early line outside a loop
        torch.manual_seed(args.seed)  # same initial weights on every rank
        if args.mode not in ("train", "bench"):
            check_written_by(args)
        check_sizes(args, self.device, self.local_batch)
        if (args.mode == "train" and (args.eval_every or 0) > 0 and args.is_image
                and args.dataset not in CLASSIFIER_FD):  # fail now, not at the first evaluation hours in
            load_fid_inception("cpu", args.inception_weights)
        if self.master:  # every folder this run writes to, checked before any work
            if args.mode in ("train", "bench") or "out_dir" in getattr(args, "given", {"out_dir"}):
                writable_folder(args.out_dir, "--out-dir")
            else:  # --mode sample/eval/... write their log (and eval's figures) beside the checkpoint
                writable_folder(args.out_dir, "the checkpoint's folder", default_of="--out-dir")
            if args.mode == "train":
                lock_folder(args.out_dir)
            if args.mode == "sample" or (args.mode == "train" and (args.sample_every or 0) > 0):
                writable_folder(args.samples_out, "--samples-out")
        config = config_dict(args)  # the run's first line: every value in force, presets resolved
        idle = (RUN_FLAGS | {"method", "nfe_list", "is_image", "allow_changed"}
                | getattr(args, "not_in_force", set()))
        self.print(f"{args.method} --mode {args.mode}: " + " ".join(
            f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in sorted(config.items())
            if k not in idle and v is not None))


def check_written_by(args, path=None, flag="--ckpt"):
    """sample/eval refuse a checkpoint that another script wrote (so does asfm.py's --init, whose
    file must exist: a missing --ckpt says 'train first' when it is loaded)."""
    path = path or args.ckpt
    if flag != "--ckpt" and not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file; pass a ckpt.pt written by this script")
    if os.path.isfile(path):
        written_by = (read_checkpoint(path).get("config") or {}).get("method")
        if written_by and written_by.split("-")[0] != args.method.split("-")[0]:
            raise UserError(f"{flag} {path} was written by {written_by}, not {args.method}: "
                            f"use the script that wrote it, or another {flag}")


def check_sizes(args, device, local_batch):
    """One-line errors, before anything is allocated, for sizes that cannot fit in memory:
    the network (weights; training adds gradients, EMA and Adam's two moments), one batch
    at the network's first layer (a lower bound of its activations), and the samples that
    sampling and evaluation collect on the CPU."""
    shape = data_shape(args)
    train = args.mode in ("train", "bench")
    flag, n = ("--n", args.n) if args.mode == "sample" else ("--fid-n", args.fid_n)
    n = n if args.mode in ("sample", "eval", "translate") or (train and args.eval_every) else 0
    batch = local_batch if train or not n else min(args.batch_size, n)
    per_sample = args.width  # floats out of the first layer: width (x H x W for a conv,
    if len(shape) == 3:      # / patch^2 for a DiT's patch embedding)
        per_sample *= shape[1] * shape[2] // (args.patch ** 2 if args.arch in ("dit", "func") else 1)
    check_fits(4 * batch * per_sample, device, f"one batch of {batch} at the first layer",
               "lower --batch-size" + (" or --image-size" if len(shape) == 3 else ""))
    params = estimate_params(args, shape)
    check_fits(4 * params * (5 if train else 1), device,
               f"a network of {params:,} parameters" + (" (weights, gradients, EMA, Adam)" if train else ""),
               "lower --width or --depth")
    check_fits(2 * 4 * n * math.prod(shape), torch.device("cpu"), f"{flag} {n} samples",
               f"lower {flag} (or sample in several runs with other --seed)")


def config_dict(args):
    """argparse namespace -> plain dict that torch.load(weights_only=True) accepts."""
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, (list, tuple)):
            v = [x for x in v if isinstance(x, (int, float, str, bool))]
        if v is None or isinstance(v, (int, float, str, bool, list)):
            out[k] = v
    return out


#################################################################################
#                      7. Samples, images and benchmarks                        #
#################################################################################

def save_image_grid(x, path, nrow=None):
    """Images in [-1, 1] -> one PNG grid."""
    from torchvision.utils import save_image
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_image(x.float().cpu(), path, nrow=nrow or max(1, int(math.sqrt(len(x)))),
               normalize=True, value_range=(-1, 1))


def save_scatter(panels, path, lim=5.0, ref=None, size=3.0):
    """2-D point sets side by side: panels = [(title, points [N, 2]), ...]; `ref` in grey."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), squeeze=False)
    for ax, (title, pts) in zip(axes[0], panels):
        if ref is not None:
            ax.scatter(*ref[:2000].cpu().T, s=1, c="0.8")
        ax.scatter(*pts[:2000].float().cpu().T, s=1, c="C0")
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), title=title, xticks=[], yticks=[], aspect="equal")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_trajectories(panels, path, lim=5.0, ref=None, n_paths=64, size=3.0):
    """2-D ODE paths side by side: panels = [(title, [x_0, x_1, ..., x_N] each [B, 2]), ...].
    Grey: reference data; lines: the first n_paths trajectories; dots: their end points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), squeeze=False)
    for ax, (title, traj) in zip(axes[0], panels):
        path_xy = torch.stack([p[:n_paths].float().cpu() for p in traj])  # (T, n, 2)
        if ref is not None:
            ax.scatter(*ref[:2000].cpu().T, s=1, c="0.85")
        ax.plot(path_xy[:, :, 0], path_xy[:, :, 1], lw=0.6, c="C0", alpha=0.7)
        ax.scatter(*path_xy[0].T, s=4, c="k")
        ax.scatter(*path_xy[-1].T, s=4, c="C3")
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), title=title, xticks=[], yticks=[], aspect="equal")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def export_samples(path, samples, nfe):
    """.npz with key `samples` (uint8 NHWC for images, float32 [N, 2] for 2-D) and `nfe`."""
    s = samples.detach().float().cpu()
    s = to_uint8(s).permute(0, 2, 3, 1).numpy() if s.ndim == 4 else s.numpy()  # float32 already
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    np.savez(path, samples=s, nfe=np.array(nfe))


def own_rng(fn):
    """Run fn(args, run, ...) on its own copy of the RNG streams: sampling and evaluation during
    training then leave the training draws untouched (a resumed run, which skips them, draws
    exactly what the uninterrupted run drew). It runs in the evaluation precision (--eval-amp)."""
    def wrapped(args, *rest, **kw):
        run = kw.get("run") or next(r for r in rest if isinstance(r, Run))
        with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
            with run.sampling():
                return fn(args, *rest, **kw)
    return wrapped


def sampler(sample, net, data, run, x0=None):
    """The four methods sample alike: sample(net, x0, nfe) -> (x, info) with info["nfe"] the
    network evaluations used. This gives the sample_fn(n, nfe) -> (x, NFE used) that
    write_samples, evaluate and benchmark take: n starting points from x0(n) (default N(0, I)
    of the data's shape), sampled in the evaluation precision (--eval-amp)."""
    def sample_fn(n, nfe):
        start = x0(n) if x0 else torch.randn(n, *data.shape, device=run.device)
        with run.sampling():
            x, info = sample(net, start, nfe)
        return x.float(), info["nfe"]
    return sample_fn


def sample_in_batches(sample_fn, n, nfe, batch, print_fn=print):
    """n samples from sample_fn(k, nfe) -> (x, NFE used), `batch` at a time, collected on the
    CPU; prints progress on long runs. NaN/inf samples stop with one line (nothing is written)."""
    xs, used, progress = [], None, Progress(f"sampling nfe={nfe}", n, print_fn)
    for i in range(0, n, batch):
        x, used = sample_fn(min(batch, n - i), nfe)
        if not torch.isfinite(x).all():
            raise UserError(f"sampling at NFE {nfe} gave NaN/inf values (nothing written): the "
                            "checkpoint has probably diverged; sample an earlier one or retrain")
        xs.append(x.float().cpu())
        progress.update(i + len(x))
    return torch.cat(xs), used


@own_rng
def write_samples(args, data, sample_fn, run):
    """--mode sample: --n samples at each --nfe from sample_fn(n, nfe) -> (x, nfe_used),
    written as <samples-out>/nfe<k>.npz and a grid (images) or scatter plot (2-D). The RNG is
    re-seeded from --seed for each NFE: every NFE, and every script, starts from the same noise."""
    panels = []
    for nfe in args.nfe_list:
        torch.manual_seed(args.seed)
        x, used = sample_in_batches(sample_fn, args.n, nfe, args.batch_size, run.print)
        export_samples(os.path.join(args.samples_out, f"nfe{nfe}.npz"), x, used)
        if data.is_image:
            save_image_grid(x, os.path.join(args.samples_out, f"nfe{nfe}.png"))
        panels.append((f"NFE {used}", x))
        run.print(f"wrote {len(x)} samples (NFE {used}, {run.eval_precision}) to "
                  f"{args.samples_out}/nfe{nfe}.npz")
    if not data.is_image:
        save_scatter(panels, os.path.join(args.samples_out, "samples.png"), ref=data.fresh(2000))


@own_rng
def evaluate(args, run, data, sample_fn, nfes=None, n=None):
    """FID/IS/precision/recall (images) or sliced W2 / energy distance to fresh data (2-D),
    from sample_fn(n, nfe) -> (samples, nfe_used), for each NFE (re-seeded from --seed for each,
    as write_samples: `--nfe rk45` and `--nfe 1,2,rk45` score the same RK45 samples)."""
    results, n = {}, n or args.fid_n
    if args.dataset in CLASSIFIER_FD:  # no Inception: a small classifier's features
        small = ClassifierFD(args.dataset, args.image_size, fid_cache_dir(args), run.device)
        floor, ceiling = small.floor_and_ceiling()
        run.print(f"{args.dataset}-FD floor {floor:.4g} ({CLASSIFIER_FD[args.dataset]['split']}), "
                  f"noise ceiling {ceiling:.4g}; samples are scored against the held-out split")
    elif data.is_image:
        inception = load_fid_inception(run.device, args.inception_weights)
        name = f"{args.dataset}-{args.image_size}"
        if args.dataset == "folder":
            name += "-" + os.path.basename(os.path.abspath(args.data_dir))
        ref = reference_stats(name, lambda: uint8_batches(data, workers=args.workers), inception,
                              fid_cache_dir(args))
    else:
        ref = data.fresh(n)
    for nfe in nfes or args.nfe_list:
        torch.manual_seed(args.seed)
        x, used = sample_in_batches(sample_fn, n, nfe, args.batch_size, run.print)
        m = (small.report(x) if args.dataset in CLASSIFIER_FD else fid_report(inception, to_uint8(x), ref)
             if data.is_image else toy_metrics(x, ref))
        m.update(nfe=used, n=len(x), weights=args.weights, precision=run.eval_precision)
        results[nfe] = m
        run.print(f"eval nfe={nfe}: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else
                                                 f"{k}={v}" for k, v in m.items()))
    return results


def fid_cache_dir(args):
    """runs/fid_stats beside the run folder: FID reference statistics, the digits classifier."""
    return os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "..", "fid_stats")


def benchmark(run, train_step, sample_fn, nfes, batch, iters=10, warmup=2):
    """--mode bench: training steps/s, samples/s at each NFE, and peak memory."""
    cuda = run.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def timed(fn, k):
        for _ in range(warmup):
            fn()
        sync()
        t = time.perf_counter()
        for _ in range(k):
            fn()
        sync()
        return (time.perf_counter() - t) / k

    out = {"step_s": timed(train_step, iters)}
    run.print(f"bench train: {1 / out['step_s']:.2f} steps/s ({out['step_s'] * 1e3:.1f} ms/step, "
              f"batch {batch})")
    for nfe in nfes:
        sec = timed(lambda: sample_fn(batch, nfe), max(1, iters // 2))
        out[f"samples_per_s_nfe{nfe}"] = batch / sec
        run.print(f"bench sample nfe={nfe}: {batch / sec:.1f} samples/s (batch {batch})")
    if cuda:
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource
        out["peak_mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    run.print(f"bench peak memory: {out['peak_mem_gb']:.2f} GiB ({'GPU' if cuda else 'process RSS'})")
    return out


#################################################################################
#                                     8. CLI                                    #
#################################################################################

TOY_DATASETS = ("8gaussians", "moons", "checkerboard", "spirals", "circles",
                "tri-src", "tri-tgt", "points")
IMAGE_DATASETS = ("cifar10", "celeba", "folder", "digits", "photos")
ARCHS = ("mlp", "unet", "ddpmpp", "dit", "func")

# Network sizes and training recipes. A method file copies these and overrides what its
# paper's recipe changes (learning rate, batch, steps, EMA). Flags set on the command
# line always win over the preset.
PRESETS = {
    # 2-D toys on CPU: a 3x256 MLP, seconds to minutes.
    "toy": dict(arch="mlp", width=256, depth=3, steps=5000, batch_size=512, lr=1e-3,
                ema_decay=0.999, warmup=0, log_every=500, sample_every=0, ckpt_every=1000,
                fid_n=5000, dropout=0.0, hflip=False),
    # Images on CPU in minutes: 16x16, a <0.5M-parameter U-Net or a 4-block DiT.
    "tiny": dict(arch="unet", image_size=16, width=24, depth=1, ch_mult=(1, 2), attn_res=(8,),
                 heads=4, patch=2, steps=2000, batch_size=64, lr=1e-3, ema_decay=0.999,
                 warmup=100, log_every=100, sample_every=1000, ckpt_every=500, fid_n=1000,
                 dropout=0.0, hflip=True),
    # CIFAR-10: a DDPM-style U-Net of 38.3M parameters (DDPM's 35.7M net plus scale/shift time
    # modulation; not RF's 62M DDPM++/NCSN++) with RF's optimizer recipe: Adam 2e-4, batch 128,
    # EMA 0.9999.
    "cifar10": dict(arch="unet", image_size=32, width=128, depth=2, ch_mult=(1, 2, 2, 2),
                    attn_res=(16,), heads=6, patch=2, steps=800_000, batch_size=128, lr=2e-4,
                    ema_decay=0.9999, warmup=5000, log_every=100, sample_every=10_000,
                    ckpt_every=5000, fid_n=50_000, dropout=0.1, hflip=True),
    # CelebA 64x64 (178 -> 140 centre crop), same network with one more resolution (82.8M).
    "celeba64": dict(arch="unet", image_size=64, width=128, depth=2, ch_mult=(1, 2, 2, 2, 4),
                     attn_res=(16,), heads=6, patch=4, steps=500_000, batch_size=128, lr=2e-4,
                     ema_decay=0.9999, warmup=5000, log_every=100, sample_every=10_000,
                     ckpt_every=5000, fid_n=50_000, dropout=0.1, hflip=True),
}
# DiT-S-like widths when --arch dit is used with an image preset (depth 12, 384 wide).
DIT_SIZE = {"tiny": dict(width=64, depth=4), "cifar10": dict(width=384, depth=12),
            "celeba64": dict(width=384, depth=12)}
# --arch ddpmpp with the cifar10 preset: RF's DDPM++ (4 res-blocks per level, dropout 0.15).
DDPMPP_SIZE = {"cifar10": dict(depth=4, dropout=0.15)}


def one_line_errors(parser):
    """argparse prints its usage block before an error; ours print one line (exit code 2)."""
    parser.error = lambda message: parser.exit(2, f"error: {message} (see --help)\n")
    return parser


def add_common_args(parser, modes=("train", "sample", "eval", "bench"), presets=None):
    """The flags all four method scripts share, in their own --help group (a script adds its
    method's group first, so --help lists those first). None defaults are filled by the preset;
    `presets` (the script's PRESETS) are listed at the end of --help."""
    one_line_errors(parser)
    flag = lambda k, v: ("--" if v is not False else "--no-") + k.replace("_", "-") + (  # noqa: E731
        "" if isinstance(v, bool) else "\xa0" + (",".join(map(str, v)) if isinstance(v, tuple) else str(v)))
    parser.epilog = presets and "\n".join(
        [textwrap.fill("presets: a flag left unset takes its preset's value (--preset defaults to toy for "
                       "2-D data, cifar10 and celeba64 for those datasets, tiny for other images; digits "
                       "never flips); the run's first line prints every value in force", 100)]
        + [textwrap.fill(f"  {name}: " + " ".join(flag(k, v) for k, v in p.items()), 100,
                         subsequent_indent="      ", break_on_hyphens=False).replace("\xa0", " ")
           for name, p in presets.items()]
        + ["  --arch dit: " + "; ".join(f"{name} --width {d['width']} --depth {d['depth']}"
                                        for name, d in DIT_SIZE.items())])
    a = parser.add_argument_group("flags shared by the four scripts").add_argument
    a("--dataset", default="8gaussians", help=f"one of {IMAGE_DATASETS + TOY_DATASETS}")
    a("--data-dir", default="data", help="dataset root, image folder, or .npy for --dataset points")
    a("--image-size", type=int, default=None, help="resolution images are resized to")
    a("--arch", default=None, choices=ARCHS, help="network (default: mlp for 2-D, unet for images)")
    a("--preset", default=None, choices=sorted(PRESETS), help="size/recipe (default from dataset)")
    a("--width", type=int, default=None, help="U-Net base channels / DiT or MLP hidden size")
    a("--depth", type=int, default=None, help="U-Net res-blocks per level / DiT or MLP layers")
    a("--dropout", type=float, default=None)
    a("--steps", type=int, default=None, help="training steps (optimizer updates)")
    a("--batch-size", type=int, default=None, help="global batch size (split over DDP ranks)")
    a("--lr", type=float, default=None)
    a("--warmup", type=int, default=None, help="linear learning-rate warmup steps")
    a("--grad-clip", type=float, default=1.0, help="gradient norm clip (0 = off)")
    a("--ema-decay", type=float, default=None)
    a("--hflip", action=argparse.BooleanOptionalAction, default=None, help="random horizontal flips")
    a("--seed", type=int, default=0)
    a("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    a("--amp", default="auto", choices=("auto", "bf16", "fp32"),
      help="auto = bf16 autocast + TF32 on CUDA, fp32 on CPU")
    a("--eval-amp", default="fp32", choices=("fp32", "bf16"),
      help="precision of evaluation and sample export (FID samples, RK45, likelihood) and of "
      "reflow pairs: fp32 (default; TF32 off) or bf16 autocast with TF32 (faster on GPUs)")
    a("--compile", action="store_true", help="torch.compile the training network")
    a("--channels-last", action="store_true", help="channels_last memory format (images)")
    a("--workers", type=int, default=2, help="DataLoader worker processes (image data)")
    a("--out-dir", default=None, help="run folder (default runs/<method>-<dataset>-<preset>)")
    a("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt if it exists")
    a("--overwrite", action="store_true", help="train from scratch over an existing <out-dir>/ckpt.pt")
    a("--allow-changed", default="", help="with --resume: comma list of flags changed on purpose, "
      "e.g. lr,batch-size (--resume refuses other changes of data, network, method, batch, lr or "
      "schedule; --steps may always grow)")
    a("--log-every", type=int, default=None)
    a("--sample-every", type=int, default=None, help="save a sample grid every N steps (0 = off)")
    a("--ckpt-every", type=int, default=None)
    a("--mode", default="train", choices=modes, help="sample/eval/edit/translate read a checkpoint (--ckpt): "
      "its data, network and method flags are taken from it, training flags are refused; bench times training "
      "steps (the training loop's flags are refused)")
    a("--ckpt", default=None, help="checkpoint for sample/eval/bench (default <out-dir>/ckpt.pt)")
    a("--n", type=int, default=64, help="number of samples for --mode sample")
    a("--nfe", default=None, help="comma list of step counts, e.g. 1,2,4 (add rk45 where supported)")
    a("--samples-out", default=None, help="folder for --mode sample output (default <out-dir>/samples)")
    a("--fid-n", type=int, default=None, help="samples for FID (papers: 50000)")
    a("--inception-weights", default=None, help="path to pt_inception-2015-12-05-6726825d.pth")
    a("--eval-every", type=int, default=0, help="evaluate (FID / 2-D distance) every N steps")
    a("--weights", default="ema", choices=("ema", "online"),
      help="weights that sample/eval use: the EMA average (default) or the online training weights")
    return parser


# Flags that say how to run now; everything else can come from a checkpoint's saved config.
RUN_FLAGS = {"mode", "ckpt", "n", "nfe", "samples_out", "fid_n", "eval_every", "resume", "device",
             "overwrite", "amp", "eval_amp", "compile", "channels_last", "workers", "out_dir",
             "weights", "seed", "allow_changed",
             "inception_weights", "sample_res", "cfg", "src_class", "tgt_class", "ckpt_b",
             "translate", "bpd", "div", "edit_index", "edit_noise", "conv_iters", "n_conv",
             "sampler"}
# Saved flags that decide what a checkpoint's samples are: sampling it with another value of
# one of them is refused (training-only flags such as --lr or --steps do nothing there).
SAMPLING_KEYS = {"dataset", "image_size", "arch", "preset", "width", "depth", "anchor_input", "inr_width",
                 "inr_depth", "inr_head", "raw_read", "local_read", "ode", "param", "vp_steps",
                 "vp_schedule", "vp_betas", "sigma_min", "sigma_max", "sigma_data", "bank_update",
                 "class_cond", "source", "stage"}
# Saved flags that --resume may change: how to run now (but not --seed: it picks the data order
# and noise), how long to train, how often to log, save and sample, and what starts a fresh run.
RESUME_FREE = (RUN_FLAGS - {"seed"}) | {"steps", "log_every", "ckpt_every", "sample_every", "init",
                                        "rf_steps", "two_step_sigma", "method", "nfe_list", "is_image",
                                        "cond_classes"}  # the last four follow from other flags


def parse_args(parser, argv=None, may_differ=None, old_defaults=None):
    """parser.parse_args(argv), with args.given = the flags set on the command line. Then, when
    a mode other than train/bench reads a checkpoint (--ckpt, or <--out-dir>/ckpt.pt): every
    flag not set on the command line (dataset, network, method flags) is taken from the
    checkpoint's saved config, and --out-dir defaults to the checkpoint's folder. So
    `--mode sample --ckpt runs/x/ckpt.pt` is enough. A SAMPLING_KEYS flag set to another value
    than the checkpoint's is refused (sampling an 8gaussians model as moons is wrong, not a choice),
    except those in may_differ[mode]. old_defaults(config): {flag: what an older config holds}."""
    argv = attach_negative_values(sys.argv[1:] if argv is None else list(argv))
    args = parse_given(parser, argv)
    ckpt_path = args.ckpt or (os.path.join(args.out_dir, "ckpt.pt") if args.out_dir else None)
    if args.mode in ("train", "bench") or not (args.ckpt or os.path.isfile(ckpt_path or "")):
        return args
    ckpt = read_checkpoint(ckpt_path)  # once per command: check_written_by and load_weights reuse it
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    if config.get("class_cond") is None and "cond_classes" in config:  # scoreflow's default: what the
        # run chose (classes where its data had them), so --class-cond matches and --no-class-cond does not
        config = {**config, "class_cond": bool(config["cond_classes"])}
    config = {**(old_defaults(config) if old_defaults else {}), **config}
    checked = SAMPLING_KEYS - set((may_differ or {}).get(args.mode, ()))
    differ = [k for k in sorted(args.given) if k in config and k in checked
              and not _same(k, getattr(args, k), config[k])]
    if differ:
        raise UserError(f"{flag_text(vars(args), differ)}: {ckpt_path} was written with "
                        f"{flag_text(config, differ)}: pass the same flags, or leave them out "
                        "(they are read from the checkpoint)")
    parser.set_defaults(**{k: v for k, v in config.items() if k in vars(args) and k not in RUN_FLAGS})
    if "out_dir" not in args.given:
        parser.set_defaults(out_dir=os.path.dirname(os.path.abspath(ckpt_path)))
    given = args.given
    args = parser.parse_args(argv)  # the command line, then the checkpoint's config, then defaults
    args.given = given
    return args


def parse_given(parser, argv):
    """parser.parse_args(argv), with args.given = the set of flags set on the command line (a
    set: config_dict leaves it out of checkpoints)."""
    args = parser.parse_args(argv)
    unset = object()  # parse again into a namespace that already has every dest: argparse then
    given = parser.parse_args(argv, argparse.Namespace(**{k: unset for k in vars(args)}))
    args.given = {k for k, v in vars(given).items() if v is not unset}  # leaves unset ones alone
    return args


def attach_negative_values(argv):
    """'--lr -1e-3' -> '--lr=-1e-3': argparse reads a '-' word that is not a plain decimal
    (-1e-3, -inf) as a flag, and would say '--lr: expected one argument'."""
    out = []
    for word in argv:
        try:
            number = word.startswith("-") and not word.startswith("--") and float(word) is not None
        except ValueError:
            number = False
        if number and out and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] += "=" + word
        else:
            out.append(word)
    return out


def drop_flags(argv, dests):
    """argv without the flags named by their dests (and the value after each that takes one)."""
    argv, out, skip = attach_negative_values(argv), [], False
    for word in argv:
        name = word[2:].split("=")[0].replace("-", "_") if word.startswith("--") else None
        if skip and name is None:  # the dropped flag's value
            skip = False
            continue
        skip = name in dests and "=" not in word
        if name not in dests:
            out.append(word)
    return out


def flag_names(text):
    """'lr, --batch-size' -> ['lr', 'batch_size'] (argparse dests)."""
    return [w.strip().lstrip("-").replace("-", "_") for w in str(text).split(",") if w.strip()]


def flag_text(values, keys):
    """['lr', 'same_t'] of {'lr': 0.5, 'same_t': True} -> '--lr 0.5 --same-t' (False or None, a
    flag left unset: 'no --same-t')."""
    words = []
    for k in keys:
        v, name = values.get(k), "--" + k.replace("_", "-")
        words.append(name if v is True else f"no {name}" if v is False or v is None else f"{name} {v}")
    return " ".join(words)


def _same(key, a, b):
    if key in ("data_dir", "source_dir") and isinstance(a, str) and isinstance(b, str):
        return os.path.realpath(a) == os.path.realpath(b)  # the same folder, however it is written
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def finish_args(args, presets=PRESETS, method="run", default_nfe="1,2,4", name=None, archs=ARCHS[:-1],
                no_rk45=None, ranges=None, applies=None):
    """Fill unset flags from the preset, check them, and return args (one-line errors). `method`
    is stored in checkpoints (resume and sample check it); the default run folder is
    runs/<name>-<dataset>-<preset>, name = the script's (default: method). `archs`: the --arch
    values the script trains (all but func, consistency_func.py's INR generator, by default).
    no_rk45: for methods without an ODE, why --nfe rk45 is refused and what --nfe counts.
    ranges / applies: the script's own flags' FLAG_RANGES and APPLIES entries."""
    if args.dataset not in IMAGE_DATASETS + TOY_DATASETS:
        raise UserError(f"unknown dataset '{args.dataset}': choose one of "
                        f"{', '.join(IMAGE_DATASETS + TOY_DATASETS)}")
    args.is_image = args.dataset in IMAGE_DATASETS
    if args.preset is None:
        args.preset = ("toy" if not args.is_image else
                       {"cifar10": "cifar10", "celeba": "celeba64"}.get(args.dataset, "tiny"))
    if args.preset not in presets:
        raise UserError(f"unknown preset '{args.preset}': choose one of {', '.join(presets)}")
    if args.dataset == "digits" and getattr(args, "hflip", None) is None:
        args.hflip = False  # a mirrored digit is another digit, or none
    preset = dict(presets[args.preset])
    if args.arch == "dit" and args.preset in DIT_SIZE:
        preset.update(DIT_SIZE[args.preset])
    preset.update(DDPMPP_SIZE.get(args.preset, {}) if args.arch == "ddpmpp" else {})
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.arch not in archs:
        raise UserError(f"--arch {args.arch}: this script trains {', '.join(archs)} (func, the INR "
                        "image-function generator, is consistency_func.py's)")
    if args.is_image and args.arch == "mlp":
        raise UserError("--arch mlp is for 2-D data; use unet, ddpmpp or dit for images "
                        "(or func in consistency_func.py)")
    if not args.is_image and args.arch != "mlp":
        raise UserError(f"--arch {args.arch} needs images; 2-D data uses --arch mlp")
    args.nfe_list = parse_nfe(default_nfe if args.nfe is None else args.nfe)  # "" is an error
    if no_rk45 and "rk45" in args.nfe_list:
        raise UserError(f"--nfe rk45 does not apply: {no_rk45}")
    rules = {**APPLIES, **(applies or {})}
    check_applies(args, rules)
    # what the run's first line leaves out (a set, like args.given: not saved in checkpoints)
    args.not_in_force = {k for k, rule in rules.items() if not applies_to(args, rule)}
    if not args.is_image:
        args.image_size = None
    if args.arch == "dit" and args.image_size % args.patch:
        raise UserError(f"--image-size {args.image_size} is not divisible by the DiT patch "
                        f"size {args.patch}: pick an image size that is a multiple of it")
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        raise UserError("--resume continues <out-dir>/ckpt.pt and --overwrite starts over: pass one")
    unknown = [k for k in flag_names(getattr(args, "allow_changed", "")) if k not in vars(args)]
    if unknown:
        raise UserError(f"--allow-changed: {', '.join(unknown)} is not a flag of this script")
    check_numbers(args, {**FLAG_RANGES, **(ranges or {})})
    args.out_dir = args.out_dir or os.path.join("runs", f"{name or method}-{args.dataset}-{args.preset}")
    args.ckpt = args.ckpt or os.path.join(args.out_dir, "ckpt.pt")
    args.samples_out = args.samples_out or os.path.join(args.out_dir, "samples")
    args.method = method
    return args


# flag: the interval its value must lie in, "[" "]" including the bound and "(" ")" excluding
# it; NaN always fails. Scripts add their method's flags (finish_args(ranges=...)).
FLAG_RANGES = {"lr": "(0, inf)", "ema_decay": "[0, 1)", "dropout": "[0, 1)", "grad_clip": "[0, inf)",
               "warmup": "[0, inf)", "steps": "[0, 1e12]", "batch_size": "[1, inf)", "n": "[1, inf)",
               "fid_n": "[4, inf)", "width": "[1, inf)", "depth": "[1, inf)", "image_size": "[1, inf)",
               "log_every": "[1, inf)", "ckpt_every": "[0, inf)", "sample_every": "[0, inf)",
               "eval_every": "[0, inf)", "workers": "[0, 256]", "seed": "[0, 4294967295]"}


def check_numbers(args, ranges=FLAG_RANGES):
    """One-line errors for numeric flags outside their range (NaN and inf included), for a
    width that a DiT cannot split, and for a --device torch cannot compute on."""
    for key, interval in ranges.items():
        value = getattr(args, key, None)
        if value is None or isinstance(value, (bool, str, list, tuple)):
            continue
        low, high = (b.strip() for b in interval[1:-1].split(","))
        above = value >= float(low) if interval[0] == "[" else value > float(low)
        below = value <= float(high) if interval[-1] == "]" else value < float(high)
        if not (above and below):  # NaN compares False
            if high != "inf":
                span = f"a number in {interval}"
            else:  # inf is excluded too: say so where the flag takes floats (e.g. --lr inf)
                sign = ">=" if interval[0] == "[" else ">"
                finite = "finite " if isinstance(value, float) else ""
                span = "a finite number" if low == "-inf" else f"a {finite}number {sign} {low}"
            raise UserError(f"--{key.replace('_', '-')} {value} is out of range: use {span}")
    if getattr(args, "arch", None) in ("unet", "ddpmpp") and args.image_size:
        levels = 2 ** (len(args.ch_mult) - 1)
        if args.image_size % levels:
            raise UserError(f"--image-size {args.image_size}: the U-Net halves it "
                            f"{len(args.ch_mult) - 1} times, so use a multiple of {levels}")
    if getattr(args, "arch", None) in ("dit", "func") and args.width % math.lcm(4, args.heads):
        raise UserError(f"--width {args.width}: --arch {args.arch} needs a multiple of "
                        f"{math.lcm(4, args.heads)} (its {args.heads} attention heads, and 4 for "
                        "its 2-D sin-cos positions)")
    try:
        device = torch.device(args.device) if getattr(args, "device", None) else None
    except (RuntimeError, ValueError):
        raise UserError(f"--device {args.device}: not a device; use cpu, cuda or cuda:N") from None
    if device is not None and device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device}: only cpu and cuda are supported")


# flag: (does it apply to these args?, what it is for), or a list of such rules that must all
# hold (the first that fails is reported). A flag set on the command line where it does nothing
# is an error, not silently ignored, and the run's first line leaves out the values of flags that
# do nothing in it. Scripts add their method's flags.
# The modes that use a flag: training flags do nothing where a checkpoint is only read (--mode
# sample, eval, edit, translate: the checkpoint keeps the values it was trained with), and --mode
# bench times training steps (optimizer step, network in training mode, --amp) but runs no
# training loop (its length, EMA, data order, logging, saving).
TRAINING = (lambda a: a.mode == "train", "--mode train")
TRAINING_STEPS = (lambda a: a.mode in ("train", "bench"), "--mode train and bench")
FID_ON_IMAGES = (lambda a: a.is_image and a.dataset not in CLASSIFIER_FD,
                 "FID on image data (digits and photos are scored by their own classifiers)")
APPLIES = {
    **dict.fromkeys(["steps", "ema_decay", "log_every", "ckpt_every", "sample_every", "eval_every", "compile",
                     "resume", "overwrite"], TRAINING),
    **dict.fromkeys(["lr", "warmup", "grad_clip", "dropout"], TRAINING_STEPS),
    "hflip": [TRAINING, (lambda a: a.is_image or not a.hflip, "images (2-D points have no left and right)")],
    "image_size": (lambda a: a.is_image, "image data"),
    "channels_last": [TRAINING, (lambda a: a.is_image, "image data")],
    "workers": [(lambda a: a.mode in ("train", "eval"), "--mode train and eval (FID's reference statistics)"),
                (lambda a: a.is_image and a.dataset not in CLASSIFIER_FD,
                 "image files (2-D data, digits and photos are indexed in memory)")],
    "inception_weights": [(lambda a: a.mode in ("train", "eval"), "FID: --mode eval (and --eval-every)"),
                          FID_ON_IMAGES],
    "amp": (lambda a: a.mode in ("train", "bench"), "training (sampling runs in --eval-amp)"),
    "allow_changed": (lambda a: a.resume, "--resume"),
    "weights": (lambda a: a.mode not in ("train", "bench"), "sampling and evaluation"),
    "ckpt": (lambda a: a.mode not in ("train", "bench"),
             "sampling and evaluation (training writes <out-dir>/ckpt.pt)"),
    "n": (lambda a: a.mode in ("train", "sample"), "--mode sample (and samples during training)"),
    "samples_out": (lambda a: a.mode in ("train", "sample"), "--mode sample (and samples during training)"),
    "fid_n": (lambda a: a.mode in ("train", "eval"), "--mode eval (and evaluations during training)"),
}


def applies_to(args, rule):
    """Whether a flag with this APPLIES entry (one rule or a list) does something in this run."""
    return all(ok(args) for ok, _ in (rule if isinstance(rule, list) else [rule]))


def check_applies(args, rules):
    """One line naming every flag set on the command line that does nothing in this run, with
    what each is for (its first rule that fails)."""
    failed = {}  # what it is for -> the flags
    for key in sorted(getattr(args, "given", ())):
        rule = rules.get(key, [])
        for ok, what in (rule if isinstance(rule, list) else [rule]):
            if not ok(args):
                failed.setdefault(what, []).append(f"--{key.replace('_', '-')}")
                break
    if not failed:
        return
    names = [name for group in failed.values() for name in group]
    if len(names) == 1:
        reason = f"it is for {next(iter(failed))}; leave it out"
    elif len(failed) == 1:
        reason = f"they are for {next(iter(failed))}; leave them out"
    else:
        reason = "; ".join(f"{', '.join(group)} {'is' if len(group) == 1 else 'are'} for {what}"
                           for what, group in failed.items()) + "; leave them out"
    verb = "does" if len(names) == 1 else "do"
    raise UserError(f"{', '.join(names)} {verb} not apply to this run: {reason}")


def check_steps(args):
    """For scripts where --steps 0 would train nothing and write nothing."""
    if args.mode == "train" and args.steps == 0:
        raise UserError("--steps 0 trains nothing and writes no checkpoint: use --steps N >= 1")


def parse_nfe(text):
    """'1,2,4,rk45' -> [1, 2, 4, 'rk45']; every number must be an integer in 1..MAX_NFE."""
    out = []
    for item in str(text).split(","):
        item = item.strip().lower()
        if item == "rk45":
            out.append(item)
            continue
        try:
            k = int(item)
        except ValueError:
            raise UserError(f"--nfe '{text}': use positive integers separated by commas, "
                            "e.g. 1,2,4 (or rk45)") from None
        if k <= 0:
            raise UserError(f"--nfe must be positive (got {k}): the number of network "
                            "evaluations is at least 1")
        if k > MAX_NFE:
            raise UserError(f"--nfe {k} is out of range: use at most {MAX_NFE} network "
                            "evaluations (RK45's limit too)")
        out.append(k)
    return out


def run_cli(main, argv=None):
    """Call main(argv); a UserError becomes one line on stderr and exit code 2. So does running
    out of memory where no estimate (Run.check_sizes) saw it coming."""
    try:
        return main(argv)
    except UserError as e:  # raised in a DataLoader worker, it carries the worker's traceback
        text = str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1]
    except (MemoryError, RuntimeError) as e:  # CUDA's OutOfMemoryError is a RuntimeError
        if not (isinstance(e, MemoryError) or "out of memory" in str(e) or "can't allocate" in str(e)):
            raise
        text = (f"out of memory ({type(e).__name__}): lower --batch-size, --n or --fid-n, or the "
                "network's size (--width, --depth, --image-size)")
    print(f"error: {text}", file=sys.stderr)
    sys.exit(2)
