"""A torch Paella for parity tests (test-only): Würstchen v1's Stage B as dome272/Wuerstchen `modules.py` `Paella`
builds it, with the official module names, composed of diffusers' ports of the official blocks
(`diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_common`: ResBlock, TimestepBlock, AttnBlock,
WuerstchenLayerNorm are the official ResBlock, TimestepBlock, AttnBlock, LayerNorm2d line for line, names
included) and the official attention (`torch_reference.Attention2D`, one nn.MultiheadAttention). No package
ships Paella itself."""

import math

import numpy as np
import torch
from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_common import (
    AttnBlock,
    ResBlock,
    TimestepBlock,
    WuerstchenLayerNorm,
)
from torch import nn

from torch_reference import Attention2D


def layer_norm_2d(c):
    return WuerstchenLayerNorm(c, elementwise_affine=False, eps=1e-6)


def official_attn_block(c, c_cond, nhead, self_attn, dropout):
    block = AttnBlock(c, c_cond, nhead, self_attn=self_attn, dropout=dropout)
    block.attention = Attention2D(c, nhead)  # official names: attention.attn.{in_proj_*, out_proj.*}
    return block


class TorchPaella(nn.Module):
    """The official Paella's modules, forward and init (keyword arguments and defaults as the official ones)."""

    def __init__(
        self,
        c_in=256,
        c_out=256,
        num_labels=8192,
        c_r=64,
        patch_size=2,
        c_cond=1024,
        c_hidden=(640, 1280, 1280),
        nhead=(-1, 16, 16),
        blocks=(4, 12, 4),
        level_config=('CT', 'CTA', 'CTA'),
        effnet_embd=16,
        byt5_embd=1536,
        kernel_size=3,
        dropout=0.1,
        self_attn=True,
    ):
        super().__init__()
        self.c_r, self.num_labels = c_r, num_labels
        levels = len(c_hidden)
        dropouts = list(dropout) if isinstance(dropout, (list, tuple)) else [dropout] * levels
        self.byt5_mapper = nn.Linear(byt5_embd, c_cond)
        self.effnet_mapper = nn.Linear(effnet_embd, c_cond)
        self.seq_norm = nn.LayerNorm(c_cond, elementwise_affine=False, eps=1e-6)
        self.in_mapper = nn.Sequential(
            nn.Embedding(num_labels, c_in), nn.LayerNorm(c_in, elementwise_affine=False, eps=1e-6)
        )
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(patch_size),
            nn.Conv2d(c_in * patch_size**2, c_hidden[0], kernel_size=1),
            layer_norm_2d(c_hidden[0]),
        )

        def make(kind, i, c_skip=0):
            c = c_hidden[i]
            if kind == 'C':
                return ResBlock(c, c_skip, kernel_size=kernel_size, dropout=dropouts[i])
            if kind == 'T':
                return TimestepBlock(c, c_r)
            if kind == 'A':
                return official_attn_block(c, c_cond, nhead[i], self_attn, dropouts[i])
            raise ValueError(kind)

        self.down_blocks = nn.ModuleList()
        for i in range(levels):
            level = nn.ModuleList()
            if i > 0:
                level.append(
                    nn.Sequential(
                        layer_norm_2d(c_hidden[i - 1]), nn.Conv2d(c_hidden[i - 1], c_hidden[i], kernel_size=2, stride=2)
                    )
                )
            level.extend(make(kind, i) for _ in range(blocks[i]) for kind in level_config[i])
            self.down_blocks.append(level)
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            level = nn.ModuleList()
            for j in range(blocks[i]):
                for k, kind in enumerate(level_config[i]):
                    first_with_skip = i < levels - 1 and j == 0 and k == 0
                    level.append(make(kind, i, c_hidden[i] if first_with_skip else 0))
            if i > 0:
                level.append(
                    nn.Sequential(
                        layer_norm_2d(c_hidden[i]),
                        nn.ConvTranspose2d(c_hidden[i], c_hidden[i - 1], kernel_size=2, stride=2),
                    )
                )
            self.up_blocks.append(level)
        self.clf = nn.Sequential(
            layer_norm_2d(c_hidden[0]),
            nn.Conv2d(c_hidden[0], c_out * patch_size**2, kernel_size=1),
            nn.PixelShuffle(patch_size),
        )
        self.out_mapper = nn.Sequential(layer_norm_2d(c_out), nn.Conv2d(c_out, num_labels, kernel_size=1, bias=False))
        self._official_init(blocks)

    def _official_init(self, blocks):
        for m in self.modules():  # Conv2d and Linear only (not ConvTranspose2d, not the MHA's in_proj)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.byt5_mapper.weight, std=0.02)
        nn.init.normal_(self.effnet_mapper.weight, std=0.02)
        nn.init.xavier_uniform_(self.embedding[1].weight, 0.02)
        nn.init.zeros_(self.clf[1].weight)
        nn.init.normal_(self.in_mapper[0].weight, std=math.sqrt(1 / self.num_labels))
        self.out_mapper[1].weight.data = self.in_mapper[0].weight.data[:, :, None, None].clone()
        for level in list(self.down_blocks) + list(self.up_blocks):
            for block in level:
                if isinstance(block, ResBlock):
                    block.channelwise[-1].weight.data *= np.sqrt(1 / sum(blocks))
                elif isinstance(block, TimestepBlock):
                    nn.init.zeros_(block.mapper.weight)

    def gen_r_embedding(self, r, max_positions=10000):
        half = self.c_r // 2
        freqs = torch.arange(half).float().mul(-math.log(max_positions) / (half - 1)).exp()
        angles = (r * max_positions)[:, None] * freqs[None]
        emb = torch.cat([angles.sin(), angles.cos()], dim=1)
        return nn.functional.pad(emb, (0, self.c_r % 2))

    def gen_c_embeddings(self, effnet, byt5):
        b, c = effnet.shape[:2]
        seq = self.effnet_mapper(effnet.permute(0, 2, 3, 1).reshape(b, -1, c))
        if byt5 is not None:
            seq = torch.cat([seq, self.byt5_mapper(byt5)], dim=1)
        return self.seq_norm(seq)

    @staticmethod
    def _run(block, x, r_embed, c_embed, skip=None):
        if isinstance(block, ResBlock):
            return block(x, skip)
        if isinstance(block, AttnBlock):
            return block(x, c_embed)
        if isinstance(block, TimestepBlock):
            return block(x, r_embed)
        return block(x)

    def forward(self, x, r, effnet, byt5):
        """x: [B, H, W] tokens, r: [B], effnet: [B, C, h, w], byt5: [B, L, C'] or None -> logits [B, labels, H, W]."""
        r_embed = self.gen_r_embedding(r)
        c_embed = self.gen_c_embeddings(effnet, byt5)
        x = self.embedding(self.in_mapper(x).permute(0, 3, 1, 2))
        outputs = []
        for level in self.down_blocks:
            for block in level:
                x = self._run(block, x, r_embed, c_embed)
            outputs.insert(0, x)
        x = outputs[0]
        for u, level in enumerate(self.up_blocks):
            for j, block in enumerate(level):
                x = self._run(block, x, r_embed, c_embed, outputs[u] if j == 0 and u > 0 else None)
        return self.out_mapper(self.clf(x))
