"""Vision Transformer building blocks with timm parameter names, so official checkpoints load.

Keys: `patch_embed.proj`, `cls_token`, `reg_token` (register tokens), `pos_embed`,
`blocks.{i}.{norm1, attn.qkv, attn.q_bias, attn.v_bias, attn.proj, ls1.gamma, norm2, mlp.fc1,
mlp.fc2, ls2.gamma}`, `norm`.
Token order: images row-major (idx = h*W' + w); videos t-major (idx = t*H'W' + h*W' + w).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class Attention(nn.Module):
    """Multi-head self-attention on `F.scaled_dot_product_attention` (scale head_dim^-0.5).

    `qv_bias=True` (VideoMAE/SIGMA): `qkv` has no bias; learnable `q_bias`, `v_bias` (zeros) and
    a zero k bias.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qv_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias and not qv_bias)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qv_bias else None
        self.proj = nn.Linear(dim, dim)

    def effective_qkv_bias(self) -> Tensor | None:
        """The bias added to qkv: `qkv.bias`, or [q_bias, 0, v_bias] (a k bias would shift all
        of a query's scores equally, which softmax ignores)."""
        if self.q_bias is None:
            return self.qkv.bias
        return torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        B, N, D = x.shape
        qkv = F.linear(x, self.qkv.weight, self.effective_qkv_bias())  # (B, N, 3D)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, h, N, D/h)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """fc1 -> GELU (exact) -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual scale `gamma`, initialised to `init`."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: in training, drop a sample's residual with prob. `p`, scale by 1/(1-p)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: x + dp(ls1(attn(norm1 x))), then x + dp(ls2(mlp(norm2 x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qv_bias: bool = False, drop_path: float = 0.0, init_values: float | None = None,
                 eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, qv_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), attn_mask)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, D), row-major; any H, W divisible by p is accepted."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        if x.shape[-1] % p or x.shape[-2] % p:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by patch {p}")
        return self.proj(x).flatten(2).transpose(1, 2)


class TubeletEmbed(nn.Module):
    """(B, C, T, H, W) -> (B, T/t * H/p * W/p, D), t-major (Conv3d kernel = stride = (t, p, p)).

    `forward(x, ids)` embeds only the tubelets `ids` (B, n) (token indices, t-major): the same
    linear map on those tubelets alone (an MAE encoder drops the others), so it costs n / N of
    the convolution; equal to `forward(x)` gathered at `ids` up to float rounding.
    """

    def __init__(self, tubelet: int = 2, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768):
        super().__init__()
        k = (tubelet, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, k, stride=k)

    def forward(self, x: Tensor, ids: Tensor | None = None) -> Tensor:
        if ids is None:
            return self.proj(x).flatten(2).transpose(1, 2)
        B, C = x.shape[:2]
        t, p = self.proj.kernel_size[:2]
        nt, nh, nw = x.shape[2] // t, x.shape[3] // p, x.shape[4] // p
        x = x[:, :, :nt * t, :nh * p, :nw * p]  # what the convolution covers
        x = x.unflatten(4, (nw, p)).unflatten(3, (nh, p)).unflatten(2, (nt, t))
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # a view (B, nt, nh, nw, C, t, p, p)
        b = torch.arange(B, device=ids.device)[:, None]
        tubes = x[b, ids // (nh * nw), ids // nw % nh, ids % nw]  # (B, n, C, t, p, p): a copy
        return F.linear(tubes.flatten(2), self.proj.weight.flatten(1), self.proj.bias)


def sincos_1d(n_positions: int, dim: int) -> Tensor:
    """(n, dim) table: angle pos / 10000^(2*(j//2)/dim); sin on even j, cos on odd j (VideoMAE)."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / 10000 ** (2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.where(j.long() % 2 == 0, angle.sin(), angle.cos())
    return table.float()


def sincos_2d(grid_h: int, grid_w: int, dim: int, cls_token: bool = False) -> Tensor:
    """(h*w [+1], dim) MAE table: first dim/2 channels encode the column x as
    [sin(x*omega), cos(x*omega)], the last dim/2 the row y; omega_i = 10000^(-i/(dim/4)).
    Tokens row-major; a leading zero row for the CLS token if `cls_token`."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    y, x = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                          torch.arange(grid_w, dtype=torch.float64), indexing="ij")
    ax, ay = x.reshape(-1, 1) * omega, y.reshape(-1, 1) * omega
    table = torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], 1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table])
    return table.float()


def interpolate_pos_embed(pos_embed: Tensor, new_hw: tuple[int, int], n_extra: int = 1,
                          antialias: bool = False) -> Tensor:
    """Bicubic resize of the square grid part of (1, n_extra + N, D) to `new_hw` (h, w); the
    `n_extra` leading tokens (CLS) are kept as they are."""
    extra, grid = pos_embed[:, :n_extra], pos_embed[:, n_extra:]
    side = math.isqrt(grid.shape[1])
    if side * side != grid.shape[1]:
        raise ValueError(f"pos_embed grid of {grid.shape[1]} tokens is not square")
    if (side, side) == tuple(new_hw):
        return pos_embed
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_hw), mode="bicubic", align_corners=False,
                         antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, pos_embed.shape[-1]).to(pos_embed.dtype)
    return torch.cat([extra, grid], 1)


def patchify(imgs: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, h*w, p*p*C), row-major tokens, channel-last within a patch (MAE)."""
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x: Tensor, p: int, h: int, w: int, C: int = 3) -> Tensor:
    """Inverse of `patchify`: (B, h*w, p*p*C) -> (B, C, h*p, w*p)."""
    x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, C))
    return x.reshape(x.shape[0], C, h * p, w * p)


def patchify_video(v: Tensor, t: int, p: int) -> Tensor:
    """(B, C, T, H, W) -> (B, T'*h*w, t*p*p*C): t-major tokens, each tube flattened in
    (t, p, p, C) order (channel-last, as VideoMAE's pixel targets)."""
    B, C, T, H, W = v.shape
    x = v.reshape(B, C, T // t, t, H // p, p, W // p, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(B, (T // t) * (H // p) * (W // p), t * p * p * C)


def unpatchify_video(x: Tensor, t: int, p: int, nt: int, h: int, w: int, C: int = 3) -> Tensor:
    """Inverse of `patchify_video`: (B, nt*h*w, t*p*p*C) -> (B, C, nt*t, h*p, w*p)."""
    x = x.reshape(-1, nt, h, w, t, p, p, C).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(x.shape[0], C, nt * t, h * p, w * p)


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """Per-sample token selection: (B, N, D), (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# name -> (embed_dim, depth, num_heads)
vit_sizes = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12),
             "large": (1024, 24, 16)}


class VisionTransformer(nn.Module):
    """Image ViT (MAE-style init): patch embed + pos embed, optional CLS, blocks, final `norm`.

    `pos_embed="sincos"` is a fixed 2-D table (a Parameter with requires_grad=False, so it is in
    the state dict as in MAE checkpoints); "learned" is trainable, trunc-normal std .02.
    `reg_tokens` register tokens (`reg_token`, (1, R, D)) follow the CLS token, without a
    position; `no_embed_class` (timm's DINOv2-with-registers layout) gives the CLS token no
    position either, so `pos_embed` covers the patches only. `num_prefix` = CLS + registers.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 384, depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path_rate: float = 0.0,
                 init_values: float | None = None, pos_embed: str = "sincos",
                 cls_token: bool = True, qv_bias: bool = False, reg_tokens: int = 0,
                 no_embed_class: bool = False):
        super().__init__()
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.n_extra = int(cls_token and not no_embed_class)  # tokens with a position before N
        self.num_prefix = int(cls_token) + reg_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens \
            else None
        gh, gw = self.patch_embed.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, self.n_extra + gh * gw, embed_dim),
                                      requires_grad=pos_embed == "learned")
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qv_bias, dp,
                                          init_values) for dp in dpr)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(embed_dim, -1))
        if cls_token:
            nn.init.normal_(self.cls_token, std=0.02)
        if reg_tokens:
            nn.init.normal_(self.reg_token, std=0.02)
        with torch.no_grad():
            if pos_embed == "sincos":
                self.pos_embed.copy_(sincos_2d(gh, gw, embed_dim, self.n_extra == 1)[None])
            else:
                nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward_features(self, x: Tensor, keep_idx: Tensor | None = None) -> Tensor:
        """(B, C, H, W) -> normed tokens (B, num_prefix + K, D): CLS, registers, patches.
        `keep_idx` (B, K) selects the patch tokens that enter the blocks (MAE: the visible
        ones); default all."""
        p = self.patch_embed.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        x = self.patch_embed(x)  # (B, N, D)
        pos = self.pos_embed
        if grid != self.patch_embed.grid_size:
            pos = interpolate_pos_embed(pos, grid, self.n_extra)
        x = x + pos[:, self.n_extra:]
        if keep_idx is not None:
            x = gather_tokens(x, keep_idx)
        if self.reg_token is not None:
            x = torch.cat([self.reg_token.expand(x.shape[0], -1, -1), x], 1)
        if self.cls_token is not None:
            cls = self.cls_token + pos[:, :1] if self.n_extra else self.cls_token
            x = torch.cat([cls.expand(x.shape[0], -1, -1), x], 1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, D): the CLS token, or the mean token without CLS."""
        x = self.forward_features(x)
        return x[:, 0] if self.cls_token is not None else x.mean(1)

