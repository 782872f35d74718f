"""The PyTorch reference of LlamaGen's VQ image tokenizer (FoundationVision/LlamaGen
``tokenizer/tokenizer_image/vq_model.py``, ``VQ_16`` = OmniMamba's ``vq_ds16_t2i.pt``), for the parity tests of
`models/vq.py` and for benchmarks. Written fresh from LlamaGen's semantics, inference only (no losses, no
``codebook_used`` bookkeeping, dropout 0).

State-dict keys equal LlamaGen's VQModel keys. Read from LlamaGen's vq_model.py (commit 3786e6a) and certain:
  encoder.conv_in.{weight,bias}
  encoder.conv_blocks.{i}.res.{j}.{norm1,conv1,norm2,conv2}.{weight,bias}   j < num_res_blocks
  encoder.conv_blocks.{i}.res.{j}.nin_shortcut.{weight,bias}                where the block changes channels (1x1)
  encoder.conv_blocks.{last}.attn.{j}.{norm,q,k,v,proj_out}.{weight,bias}   last level only
  encoder.conv_blocks.{i}.downsample.conv.{weight,bias}                     all levels but the last
  encoder.mid.{0,2}.<resnet>, encoder.mid.1.<attn>, encoder.norm_out, encoder.conv_out
  decoder.conv_in, decoder.mid.{0,1,2}, decoder.conv_blocks.{i}.res.{j} (j < num_res_blocks + 1),
  decoder.conv_blocks.0.attn.{j} (the lowest resolution: the decoder lists levels in reverse),
  decoder.conv_blocks.{i}.upsample.conv (all but the last), decoder.norm_out, decoder.conv_out
  quantize.embedding.weight [codebook_size, codebook_embed_dim]
  quantize.codebook_used [65536]: a persistent buffer (codebook_show_usage, on by default and in VQ-16), a
      training statistic that nothing in encoding or decoding reads
  quant_conv.{weight,bias}, post_quant_conv.{weight,bias}
Not verified against the released file itself (we have not downloaded it): that `vq_ds16_t2i.pt` stores exactly these
keys under ``checkpoint["model"]`` (LlamaGen and OmniMamba load it with strict ``load_state_dict``, so it must), and
that OmniMamba's release keeps them under ``llm_backbone.vqvae.``.

LlamaGen hard-codes ch=128, num_res_blocks=2 and GroupNorm(32 groups, eps 1e-6); they are arguments here (same
defaults) so tests can run tiny models.

Public API:
  VQModel(codebook_size=16384, codebook_embed_dim=8, codebook_l2_norm=True, codebook_show_usage=True,
          encoder_ch_mult=(1, 1, 2, 2, 4), decoder_ch_mult=(1, 1, 2, 2, 4), z_channels=256, ch=128,
          num_res_blocks=2, norm_groups=32)
  model.encode_z(x) -> z [b, e, h, w] before quantisation; model.encode(x) -> (z_q, codes [b, h, w])
  model.decode(z_q) -> images; model.decode_code(codes [b, h, w]) -> images (NCHW, [-1, 1] scale)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _swish(x):
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions (1x1 conv projections), residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        b, c, height, width = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2) for proj in (self.q, self.k, self.v))  # [b, c, hw]
        weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c**-0.5, dim=-1)  # [b, query, key]
        out = torch.einsum("bij,bcj->bci", weights, v).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(in_ch: int, out_ch: int, num_res: int, attention: bool, groups: int, resample: str | None) -> nn.Module:
    level = nn.Module()
    level.res = nn.ModuleList(ResnetBlock(in_ch if j == 0 else out_ch, out_ch, groups) for j in range(num_res))
    level.attn = nn.ModuleList(AttnBlock(out_ch, groups) for _ in range(num_res if attention else 0))
    if resample == "down":
        level.downsample = Downsample(out_ch)
    elif resample == "up":
        level.upsample = Upsample(out_ch)
    return level


def _run_level(level: nn.Module, h):
    for j, res in enumerate(level.res):
        h = res(h)
        if len(level.attn):
            h = level.attn[j](h)
    for name in ("downsample", "upsample"):
        if hasattr(level, name):
            h = getattr(level, name)(h)
    return h


def _mid(channels: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels, groups), AttnBlock(channels, groups),
                          ResnetBlock(channels, channels, groups)])


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, groups, in_channels=3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        widths = [ch] + [ch * m for m in ch_mult]
        last = len(ch_mult) - 1
        self.conv_blocks = nn.ModuleList(
            _level(widths[i], widths[i + 1], num_res_blocks, i == last, groups, None if i == last else "down")
            for i in range(len(ch_mult)))
        self.mid = _mid(widths[-1], groups)
        self.norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = _run_level(level, h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, groups, out_channels=3):
        super().__init__()
        widths = [ch * m for m in reversed(ch_mult)]  # lowest resolution first
        self.conv_in = nn.Conv2d(z_channels, widths[0], 3, padding=1)
        self.mid = _mid(widths[0], groups)
        n = len(widths)
        self.conv_blocks = nn.ModuleList(
            _level(widths[max(i - 1, 0)], widths[i], num_res_blocks + 1, i == 0, groups,
                   None if i == n - 1 else "up") for i in range(n))
        self.norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = _run_level(level, h)
        return self.conv_out(_swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, embed_dim: int, l2_norm: bool, show_usage: bool):
        super().__init__()
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        if show_usage:
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self):
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def forward(self, z):
        """z [b, e, h, w] -> (z_q [b, e, h, w], codes [b, h, w]); z_q is the (normalised) codebook row."""
        z = z.permute(0, 2, 3, 1)
        flat = z.reshape(-1, z.shape[-1])
        if self.l2_norm:
            flat = F.normalize(flat, p=2, dim=-1)
        e = self.codebook()
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        codes = d.argmin(dim=1)
        z_q = e[codes].reshape(z.shape).permute(0, 3, 1, 2)
        return z_q, codes.reshape(z.shape[:3])


class VQModel(nn.Module):
    def __init__(self, codebook_size=16384, codebook_embed_dim=8, codebook_l2_norm=True, codebook_show_usage=True,
                 encoder_ch_mult=(1, 1, 2, 2, 4), decoder_ch_mult=(1, 1, 2, 2, 4), z_channels=256, ch=128,
                 num_res_blocks=2, norm_groups=32):
        super().__init__()
        self.encoder = Encoder(ch, encoder_ch_mult, num_res_blocks, z_channels, norm_groups)
        self.decoder = Decoder(ch, decoder_ch_mult, num_res_blocks, z_channels, norm_groups)
        self.quantize = VectorQuantizer(codebook_size, codebook_embed_dim, codebook_l2_norm, codebook_show_usage)
        self.quant_conv = nn.Conv2d(z_channels, codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(codebook_embed_dim, z_channels, 1)

    def encode_z(self, x):
        return self.quant_conv(self.encoder(x))

    def encode(self, x):
        return self.quantize(self.encode_z(x))

    def decode(self, z_q):
        return self.decoder(self.post_quant_conv(z_q))

    def decode_code(self, codes):
        """codes [b, h, w] -> images [b, 3, 16h, 16w] (LlamaGen decode_code with shape (b, e, h, w))."""
        return self.decode(self.quantize.codebook()[codes].permute(0, 3, 1, 2))
