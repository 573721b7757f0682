"""The backends' faster forms of three operations the networks use, chosen by backend: on XLA:CPU the
depthwise convolution as a sum of shifted, channel-scaled copies and attention one block of queries
at a time (flash attention's scheme), each with a custom VJP, and the 4x4 stride-2 transposed conv as
a 3x3 conv to its four output phases (`python bench/depthwise.py`, `python bench/attention.py` and
`python bench/conv_transpose.py` time them against the plain forms); on a GPU in bfloat16, cuDNN's
flash attention with the keys padded to the length it takes."""

import contextlib
import functools

import jax
import jax.numpy as jnp


def depthwise_kernel() -> str:
    """How `DepthwiseConv` runs: 'shifted' (a sum of k x k shifted, channel-scaled copies) on XLA:CPU,
    whose grouped convolution is 3-8x slower fwd + bwd (bench/README.md, depthwise micro-benchmark),
    'grouped' (lax's feature-grouped convolution) elsewhere."""
    return 'shifted' if jax.default_backend() == 'cpu' else 'grouped'


@jax.custom_vjp
def shifted_depthwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x: [B, H + k - 1, W + k - 1, C] (padded), kernel: [k, k, C] -> [B, H, W, C]."""
    k = kernel.shape[0]
    h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
    return sum(x[:, i : i + h, j : j + w, :] * kernel[i, j] for i in range(k) for j in range(k))


def shifted_depthwise_fwd(x, kernel):
    return shifted_depthwise(x, kernel), (x, kernel)


def shifted_depthwise_bwd(residuals, d_out):
    x, kernel = residuals
    k = kernel.shape[0]
    dx = sum(
        jnp.pad(d_out * kernel[i, j], ((0, 0), (i, k - 1 - i), (j, k - 1 - j), (0, 0)))
        for i in range(k)
        for j in range(k)
    )

    # The k·k kernel-gradient reductions one after another: side by side, XLA:CPU fuses them into one
    # multi-output reduction about 5x slower than the k·k apart (bench/README.md, depthwise).
    def tap(_, offset):
        window = jax.lax.dynamic_slice(x, (0, offset[0], offset[1], 0), d_out.shape)
        return None, jnp.sum((window * d_out).astype(jnp.float32), axis=(0, 1, 2))

    offsets = jnp.array([(i, j) for i in range(k) for j in range(k)])
    d_kernel = jax.lax.scan(tap, None, offsets)[1].reshape(kernel.shape).astype(kernel.dtype)
    return dx, d_kernel


shifted_depthwise.defvjp(shifted_depthwise_fwd, shifted_depthwise_bwd)


def conv_transpose_kernel() -> str:
    """How `ConvTranspose` runs torch's ConvTranspose2d(k=4, stride=2, padding=1): 'phases'
    (`phase_conv_transpose`) on XLA:CPU, where lax's transposed conv is 4-5x slower fwd + bwd
    (`python bench/conv_transpose.py`), 'lax' (lax.conv_transpose) elsewhere."""
    return 'phases' if jax.default_backend() == 'cpu' else 'lax'


# Output row 2m + phase of ConvTranspose2d(k=4, stride=2, padding=1) reads input rows m - 1, m, m + 1
# through these kernel rows (4: none): 2m gets x[m - 1]·w3 + x[m]·w1, 2m + 1 gets x[m]·w2 + x[m + 1]·w0.
_PHASE_TAPS = ((3, 1, 4), (4, 2, 0))


def phase_conv_transpose(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """torch's ConvTranspose2d(k=4, stride=2, padding=1) without bias as one 3x3 stride-1 conv to the
    2 x 2 output phases, then depth-to-space: the same sums, no zero-dilated input.

    x: [B, H, W, C], kernel: [4, 4, O, C] (lax.conv_transpose's with transpose_kernel=True) -> [B, 2H, 2W, O]."""
    b, h, w, _ = x.shape
    o = kernel.shape[2]
    taps = jnp.array(_PHASE_TAPS)
    padded = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))  # row and column 4: zeros
    phases = padded[taps[:, :, None, None], taps[None, None, :, :]]  # [ph, dh, pw, dw, O, C]
    phases = phases.transpose(1, 3, 5, 0, 2, 4).reshape(3, 3, kernel.shape[3], 4 * o)
    y = jax.lax.conv_general_dilated(x, phases, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y.reshape(b, h, w, 2, 2, o).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, o)


ATTENTION_KERNELS = ('blocked', 'cudnn', 'dot_product_attention', 'einsum')
# cuDNN's flash attention refuses key lengths such as Würstchen's 576 image + 77 text tokens; padded
# to a multiple of 64 (and masked by length) it takes them.
CUDNN_KEY_MULTIPLE = 64
_forced_attention_kernel: list[str] = []


def attention_kernel(dtype=jnp.float32, head_dim: int = 64) -> str:
    """How `Attention` computes softmax(q kᵀ) v for compute `dtype` and `head_dim`: 'blocked'
    (`blocked_attention`) on XLA:CPU, where it is about 2x faster than the whole score matrix
    (`python bench/attention.py`); 'cudnn' (`padded_attention` by cuDNN's flash attention) on a GPU
    in bfloat16 or float16 with a head size cuDNN takes (a multiple of 8, at most 128);
    'dot_product_attention' (XLA's) otherwise. 'einsum' is the plain form, whose FLOPs XLA counts.
    `forced_attention_kernel` overrides the choice."""
    if _forced_attention_kernel:
        return _forced_attention_kernel[-1]
    backend = jax.default_backend()
    if backend == 'cpu':
        return 'blocked'
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if backend == 'gpu' and half and head_dim % 8 == 0 and head_dim <= 128:
        return 'cudnn'
    return 'dot_product_attention'


def padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """softmax(q kᵀ / √d) v with the keys and values zero-padded to a multiple of CUDNN_KEY_MULTIPLE
    and masked by length: cuDNN's flash attention on a GPU, XLA's attention on other backends (the
    same padding and lengths, which is what the CPU tests check).

    q: [B, T, N, D], k/v: [B, S, N, D], mask: [B, S] right padding (each row ones, then zeros, as
    a tokenizer pads text: T5's mask), read as each row's length."""
    b, s = k.shape[:2]
    lengths = jnp.full((b,), s, jnp.int32) if mask is None else jnp.sum(mask, axis=-1, dtype=jnp.int32)
    pad = ((0, 0), (0, -s % CUDNN_KEY_MULTIPLE), (0, 0), (0, 0))
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    implementation = 'cudnn' if jax.default_backend() == 'gpu' else 'xla'
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=implementation)


@contextlib.contextmanager
def forced_attention_kernel(kernel: str):
    """Networks traced inside use `kernel`: 'einsum' to count a step's model FLOPs (XLA counts the body
    of the blocked kernel's loop once), any of ATTENTION_KERNELS to compare them."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f'attention kernel {kernel!r}: expected one of {ATTENTION_KERNELS}')
    _forced_attention_kernel.append(kernel)
    try:
        yield
    finally:
        _forced_attention_kernel.pop()


def blocked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, tile_bytes: int = 4 * 2**20
) -> jax.Array:
    """softmax(q kᵀ / √d) v one head and one block of queries at a time, the backward pass recomputing
    each block's probabilities from the saved log-sum-exp (flash attention's scheme, over queries).

    q: [B, T, N, D], k/v: [B, S, N, D], mask: [B, S] bool (True = attend) -> [B, T, N, D]. On a CPU a
    block's [B, rows, S] float32 scores (about `tile_bytes`) stay in cache through the softmax and its
    gradient, where the whole [B, N, T, S] matrix sends every elementwise pass to memory. The batch is
    never looped over, so a batch-sharded step stays sharded."""
    b, t, n, d = q.shape
    rows = max(8, tile_bytes // (4 * b * k.shape[1]))
    blocks = -(-t // rows)
    rows = -(-t // blocks // 8) * 8  # even blocks, little padding
    q = jnp.pad(q * jnp.asarray(d**-0.5, q.dtype), ((0, 0), (0, blocks * rows - t), (0, 0), (0, 0)))
    q = q.reshape(b, blocks, rows, n, d).transpose(3, 1, 0, 2, 4)  # [N, blocks, B, rows, D]
    k, v = (a.transpose(2, 0, 1, 3) for a in (k, v))  # [N, B, S, D]
    bias = jnp.zeros((b, 1, k.shape[2]), jnp.float32)
    if mask is not None:  # finfo.min, not -inf: a row with every key masked stays finite (uniform)
        bias = jnp.where(mask[:, None, :], bias, jnp.finfo(jnp.float32).min)
    out = _blocked_attention(q, k, v, bias)
    return out.transpose(2, 1, 3, 0, 4).reshape(b, blocks * rows, n, d)[:, :t]


def _block_scores(q: jax.Array, k: jax.Array, bias: jax.Array) -> jax.Array:
    return jnp.einsum('bqd,bsd->bqs', q, k, preferred_element_type=jnp.float32) + bias


def _block_forward(q, k, v, bias):
    """One head's block of queries: (out, log-sum-exp of its scores)."""
    s = _block_scores(q, k, bias)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    total = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum('bqs,bsd->bqd', p.astype(v.dtype), v, preferred_element_type=jnp.float32) / total
    return out.astype(v.dtype), m + jnp.log(total)


def _block_backward(k, v, bias, carry, block):
    """One head's block of queries: its dq, with its share of dk and dv added to the carry."""
    dk, dv = carry
    q, out, lse, d_out = block
    p = jnp.exp(_block_scores(q, k, bias) - lse)
    dv = dv + jnp.einsum('bqs,bqd->bsd', p.astype(d_out.dtype), d_out, preferred_element_type=jnp.float32)
    dp = jnp.einsum('bqd,bsd->bqs', d_out, v, preferred_element_type=jnp.float32)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    ds = (p * (dp - delta)).astype(q.dtype)
    dk = dk + jnp.einsum('bqs,bqd->bsd', ds, q, preferred_element_type=jnp.float32)
    return (dk, dv), jnp.einsum('bqs,bsd->bqd', ds, k, preferred_element_type=jnp.float32).astype(q.dtype)


@jax.custom_vjp
def _blocked_attention(q, k, v, bias):
    """q: [N, blocks, B, rows, D], k/v: [N, B, S, D], bias: [B, 1, S] -> [N, blocks, B, rows, D]."""
    return _blocked_attention_fwd(q, k, v, bias)[0]


def _blocked_attention_fwd(q, k, v, bias):
    def head(args):
        q_h, k_h, v_h = args
        return jax.lax.map(lambda q_block: _block_forward(q_block, k_h, v_h, bias), q_h)

    out, lse = jax.lax.map(head, (q, k, v))
    return out, (q, k, v, bias, out, lse)


def _blocked_attention_bwd(residuals, d_out):
    q, k, v, bias, out, lse = residuals

    def head(args):
        q_h, k_h, v_h, out_h, lse_h, d_out_h = args
        zeros = (jnp.zeros(k_h.shape, jnp.float32), jnp.zeros(v_h.shape, jnp.float32))
        (dk, dv), dq = jax.lax.scan(
            functools.partial(_block_backward, k_h, v_h, bias), zeros, (q_h, out_h, lse_h, d_out_h)
        )
        return dq, dk.astype(k_h.dtype), dv.astype(v_h.dtype)

    dq, dk, dv = jax.lax.map(head, (q, k, v, out, lse, d_out))
    return dq, dk, dv, None


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)
