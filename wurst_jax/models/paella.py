"""Stage B of Würstchen v1: the Paella token predictor (dome272/Wuerstchen `modules.py` `Paella`), NHWC.

A U-Net over Stage A's VQ token map that predicts, for every position, logits over the codebook:

    tokens [B, H, W] -> Embedding(num_labels -> c_in) -> LN -> pixel unshuffle(p) -> 1x1 conv -> LN2d
    levels of 'C' (ResBlock), 'T' (TimestepBlock), 'A' (AttnBlock) blocks, LN2d + k2/s2 conv between levels
    on the way down and LN2d + k2/s2 transposed conv on the way up; the first block of every up level above
    the deepest, if a 'C', gets that level's encoder output as a skip, concatenated to its depthwise conv's
    input (C + C -> C, groups C: output channel g mixes input channels 2g and 2g + 1); a level whose pattern
    starts otherwise takes no skip (the official forward passes it to the block at index 0 only)
    LN2d -> 1x1 conv (c_out·p²) -> pixel shuffle -> LN2d -> 1x1 conv without bias -> logits [B, H, W, num_labels]

Conditioning: r in [0, 1] (the noise level: the share of tokens replaced by random ones) through
`gen_r_embedding` into every TimestepBlock; one token sequence for every AttnBlock, the effnet map's
positions (row-major, [B, h·w, effnet_embd] -> `effnet_mapper`) followed by the text states (`byt5_mapper`),
then an affine-free LayerNorm (`seq_norm`). Without text (None) the sequence is the effnet tokens alone.

The initialisers are the official ones: xavier_uniform and zero biases, the conditioning mappers
normal(0.02), the embedding conv xavier with gain 0.02, `clf_1` zero, every ResBlock's last Dense scaled by
sqrt(1 / sum(blocks)), TimestepBlocks zero, the q/k/v kernels as torch's MultiheadAttention draws them, the
transposed convs with torch's ConvTranspose2d default, the token embedding normal(sqrt(1 / num_labels)) and the
logits conv a copy of it (so c_out must equal c_in, as the official copy needs).

Module names are the torch ones with dots as underscores (`up_blocks_1_0` is `up_blocks.1.0`), so
conversion is a rename (`wurst_jax.convert.wuerstchen`). With `scan_blocks` every level's repeats of its
block pattern (the first up repeat of a level with a skip aside) are one `nn.scan` over stacked params,
named `{down,up}_blocks_{level}_scan` (`scan_groups` says which torch blocks each holds).
"""

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from wurst_jax.models import layers

Dtype = Any


@dataclasses.dataclass(frozen=True)
class LevelBlocks:
    """The settings every block of one level is built from: 'C' (ResBlock), 'T' (TimestepBlock), 'A' (AttnBlock)."""

    channels: int
    num_heads: int
    dropout: float = 0.0
    kernel_size: int = 3
    self_attn: bool = True
    out_init_scale: float = 1.0
    dtype: Dtype = jnp.float32

    def make(self, kind: str, remat_policy: str, name: str) -> nn.Module:
        c, dropout, dtype = self.channels, self.dropout, self.dtype
        if kind == 'C':
            return layers.remat(layers.ResBlock, remat_policy, deterministic_argnum=3)(
                c,
                dropout,
                self.kernel_size,
                dtype,
                skip_before_depthwise=True,
                out_init_scale=self.out_init_scale,
                name=name,
            )
        if kind == 'T':
            return layers.remat(layers.TimestepBlock, remat_policy)(c, dtype, name=name)
        if kind == 'A':
            return layers.remat(layers.AttnBlock, remat_policy, deterministic_argnum=3)(
                c, self.num_heads, self.self_attn, dropout, dtype, mha_init=True, name=name
            )
        raise ValueError(f"level_config block type {kind!r} is not one of 'C', 'T', 'A'")


class PaellaGroup(nn.Module):
    """One repeat of a level's block pattern (e.g. 'CTA'): blocks `block_{k}`, without skips."""

    pattern: str
    blocks: LevelBlocks

    @nn.compact
    def __call__(self, h, r_emb, cond, deterministic):
        for k, kind in enumerate(self.pattern):
            h = run_block(self.blocks.make(kind, 'none', f'block_{k}'), kind, h, r_emb, cond, None, deterministic)
        return h, None  # nn.scan's (carry, ys)


def run_block(block: nn.Module, kind: str, h, r_emb, cond, skip, deterministic):
    if kind == 'C':
        return block(h, skip, deterministic)
    if kind == 'T':
        return block(h, r_emb)
    return block(h, cond, deterministic)


class Paella(nn.Module):
    """tokens: [B, H, W] int, r: [B] noise level in [0, 1], effnet: [B, h, w, effnet_embd],
    text: [B, L, byt5_embd] or None -> logits [B, H, W, num_labels] float32. H and W must divide by
    patch_size * 2 ** (levels - 1). Fields and defaults are the official constructor's."""

    c_in: int = 256
    c_out: int = 256
    num_labels: int = 8192
    c_r: int = 64
    patch_size: int = 2
    c_cond: int = 1024
    c_hidden: Sequence[int] = (640, 1280, 1280)
    nhead: Sequence[int] = (-1, 16, 16)
    blocks: Sequence[int] = (4, 12, 4)
    level_config: Sequence[str] = ('CT', 'CTA', 'CTA')
    effnet_embd: int = 16
    byt5_embd: int = 1536  # the official default; the released v1 Stage B was built with 1024 (CLIP-H)
    kernel_size: int = 3
    dropout: float | Sequence[float] = 0.1
    self_attn: bool = True
    scan_blocks: bool = False
    remat_policy: str = 'none'  # per block (per scanned repeat with scan_blocks): one of layers.REMAT_POLICIES
    dtype: Dtype = jnp.float32

    def _dropouts(self) -> tuple[float, ...]:
        if isinstance(self.dropout, (int, float)):
            return (float(self.dropout),) * len(self.c_hidden)
        return tuple(self.dropout)

    def _has_skip(self, up: int) -> bool:
        """Whether the first block of up level `up` takes the encoder output (a 'C' first, not the deepest)."""
        return up > 0 and self.level_config[len(self.c_hidden) - 1 - up][0] == 'C'

    def scan_groups(self) -> list[tuple[str, str, int, int, int]]:
        """With scan_blocks: (scan module name, torch prefix, first torch index, repeats, blocks per repeat)
        of every scanned run of repeats."""
        groups, levels = [], len(self.c_hidden)
        for i in range(levels):
            groups.append(
                (f'down_blocks_{i}_scan', f'down_blocks_{i}', int(i > 0), self.blocks[i], len(self.level_config[i]))
            )
        for u in range(levels):
            i, first = levels - 1 - u, int(u > 0)  # up levels above the deepest keep their first repeat apart
            groups.append(
                (
                    f'up_blocks_{u}_scan',
                    f'up_blocks_{u}',
                    first * len(self.level_config[i]),
                    self.blocks[i] - first,
                    len(self.level_config[i]),
                )
            )
        return [g for g in groups if g[3] > 0]

    def _check_inputs(self, tokens, r, effnet, text):
        unit = self.patch_size * 2 ** (len(self.c_hidden) - 1)
        if tokens.ndim != 3 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f'tokens must be an integer token map [B, H, W], got {tokens.dtype} {tokens.shape}')
        if tokens.shape[1] % unit or tokens.shape[2] % unit:
            raise ValueError(
                f'the token map {tokens.shape[1]}x{tokens.shape[2]} must divide by patch_size * '
                f'2 ** (levels - 1) = {unit}: crop or pad it to a multiple of {unit}'
            )
        if r.shape != (tokens.shape[0],):
            raise ValueError(f'r must be [B] = ({tokens.shape[0]},), one noise level per sample, got {r.shape}')
        if effnet.ndim != 4 or effnet.shape[-1] != self.effnet_embd:
            raise ValueError(
                f'effnet has shape {effnet.shape}, but this Paella maps [B, h, w, effnet_embd='
                f'{self.effnet_embd}] effnet maps (channels last): pass an NHWC map with '
                f'{self.effnet_embd} channels or build the Paella with effnet_embd={effnet.shape[-1]}'
            )
        if text is not None and (text.ndim != 3 or text.shape[-1] != self.byt5_embd):
            raise ValueError(
                f'text has shape {text.shape}, but this Paella maps [B, L, byt5_embd={self.byt5_embd}] '
                f'text states: pass states of width {self.byt5_embd} or build the Paella with '
                f'byt5_embd={text.shape[-1]}'
            )

    @nn.compact
    def __call__(
        self, tokens: jax.Array, r: jax.Array, effnet: jax.Array, text: jax.Array | None, deterministic: bool = True
    ) -> jax.Array:
        self._check_inputs(tokens, r, effnet, text)
        if self.c_out != self.c_in:
            raise ValueError(
                f'c_out={self.c_out} != c_in={self.c_in}: Paella initialises its logits conv '
                '(c_out -> num_labels) as a copy of the token embedding (num_labels x c_in), so the '
                'official model needs c_out == c_in'
            )
        levels, p, dt = len(self.c_hidden), self.patch_size, self.dtype
        dropouts = self._dropouts()
        out_scale = math.sqrt(1 / sum(self.blocks))
        cond_init = nn.initializers.normal(0.02)

        r_emb = layers.gen_r_embedding(r, self.c_r)
        b = effnet.shape[0]
        seq = layers.dense(self.c_cond, (None, 'embed'), dtype=dt, kernel_init=cond_init, name='effnet_mapper')(
            effnet.reshape(b, -1, effnet.shape[-1]).astype(dt)
        )
        if text is not None:
            text = layers.dense(self.c_cond, (None, 'embed'), dtype=dt, kernel_init=cond_init, name='byt5_mapper')(
                text.astype(dt)
            )
            seq = jnp.concatenate([seq, text], axis=1)
        cond = layers.layer_norm_2d(dt)(seq)  # seq_norm: the same affine-free LN over the token width

        embed = nn.Embed(
            self.num_labels,
            self.c_in,
            dtype=dt,
            param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(math.sqrt(1 / self.num_labels)), ('vocab', 'embed')
            ),
            name='in_mapper_0',
        )
        h = layers.layer_norm_2d(dt)(embed(tokens))
        h = layers.pixel_unshuffle(h, p)
        embedding_init = nn.initializers.variance_scaling(0.02**2, 'fan_avg', 'uniform')  # xavier, gain 0.02
        h = layers.conv(self.c_hidden[0], (1, 1), dtype=dt, kernel_init=embedding_init, name='embedding_1')(h)
        h = layers.layer_norm_2d(dt)(h)

        level_blocks = [
            LevelBlocks(self.c_hidden[i], self.nhead[i], dropouts[i], self.kernel_size, self.self_attn, out_scale, dt)
            for i in range(levels)
        ]

        def block(kind, i, name):
            return level_blocks[i].make(kind, self.remat_policy, name)

        def scanned(i, repeats, name):
            scan = layers.scanned(PaellaGroup, repeats, 3, self.remat_policy, deterministic_argnum=4)
            return scan(self.level_config[i], level_blocks[i], name=name)

        level_outputs = []  # deepest first, as the up path consumes them
        for i in range(levels):
            index = 0
            if i > 0:
                h = layers.downscale(h, self.c_hidden[i], dt, f'down_blocks_{i}_0_1')
                index = 1
            if self.scan_blocks and self.blocks[i] > 0:
                h, _ = scanned(i, self.blocks[i], f'down_blocks_{i}_scan')(h, r_emb, cond, deterministic)
            else:
                for _ in range(self.blocks[i]):
                    for kind in self.level_config[i]:
                        h = run_block(
                            block(kind, i, f'down_blocks_{i}_{index}'), kind, h, r_emb, cond, None, deterministic
                        )
                        index += 1
            level_outputs.insert(0, h)

        h = level_outputs[0]
        for u in range(levels):
            i, pattern = levels - 1 - u, self.level_config[levels - 1 - u]
            index, repeats = 0, self.blocks[i]
            if self.scan_blocks and u > 0 and repeats > 0:  # the first repeat (it may take the skip) unscanned
                for k, kind in enumerate(pattern):
                    skip = level_outputs[u] if k == 0 and self._has_skip(u) else None
                    h = run_block(block(kind, i, f'up_blocks_{u}_{k}'), kind, h, r_emb, cond, skip, deterministic)
                index, repeats = len(pattern), repeats - 1
            if self.scan_blocks:
                if repeats > 0:
                    h, _ = scanned(i, repeats, f'up_blocks_{u}_scan')(h, r_emb, cond, deterministic)
                index += repeats * len(pattern)
            else:
                for _ in range(repeats):
                    for kind in pattern:
                        skip = level_outputs[u] if index == 0 and self._has_skip(u) else None
                        h = run_block(
                            block(kind, i, f'up_blocks_{u}_{index}'), kind, h, r_emb, cond, skip, deterministic
                        )
                        index += 1
            if i > 0:
                h = layers.upscale(h, self.c_hidden[i - 1], dt, f'up_blocks_{u}_{index}_1', torch_default_init=True)

        h = layers.layer_norm_2d(dt)(h)
        h = layers.conv(self.c_out * p * p, (1, 1), dtype=dt, kernel_init=nn.initializers.zeros_init(), name='clf_1')(h)
        h = layers.layer_norm_2d(dt)(layers.pixel_shuffle(h, p))
        table = embed.embedding  # [num_labels, c_in]: the logits conv starts as its transpose

        def tied_init(key, shape, dtype=jnp.float32):
            return jnp.asarray(table, dtype).T.reshape(shape)

        logits = layers.conv(
            self.num_labels,
            (1, 1),
            use_bias=False,
            dtype=dt,
            kernel_init=tied_init,
            axes=('embed', 'vocab'),
            name='out_mapper_1',
        )(h)
        return logits.astype(jnp.float32)
