"""Per-sequence log-probabilities from logits, labels and a response mask.

Contract: ``sequence_logps(logits, labels, mask) -> (sum_logps[B], n_tokens[B])``
with labels already shifted (position ``t`` of ``logits`` predicts ``labels[t]``).
Masked positions contribute exactly 0, even when their logits are garbage (inf / NaN) and
even when their labels are out of range (e.g. HF's ``-100``); their gradient is exactly 0.

The log-softmax is computed in float32 whatever the model's compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "sequence_logps",
    "sequence_logps_wpo",
    "chunked_sequence_logps",
    "mean_logps",
    "token_logps",
    "check_logits_labels",
]


def check_logits_labels(logits, labels, mask) -> None:
    """Static shape checks (at trace time): one clear error naming the mismatching input."""
    if logits.ndim != 3:
        raise ValueError(f"logits must be [B, T, V]; got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits [B, T] = {tuple(logits.shape[:2])}"
        )
    if mask.shape != labels.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match labels shape {tuple(labels.shape)}")


def token_logps(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-token log p(labels[t]) in float32, exactly 0 where ``mask == 0``. Shape [B, T]."""
    check_logits_labels(logits, labels, mask)
    valid = mask.astype(bool)
    # Sanitise masked positions *before* the log-softmax so neither the value nor the
    # gradient can pick up NaN/inf from garbage logits there.
    x = jnp.where(valid[..., None], logits.astype(jnp.float32), 0.0)
    safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
    lp = _picked(x, safe_labels) - jax.nn.logsumexp(x, axis=-1)
    return jnp.where(valid, lp, 0.0)


@jax.custom_jvp
def _picked(x: jax.Array, labels: jax.Array) -> jax.Array:
    """``x[..., labels]``: a gather for the value (bit for bit), and a JVP written as a
    compare-select-sum so that reverse mode transposes it into a dense select
    ``where(iota == label, g, 0)`` instead of the gather's scatter-add into ``[B, T, V]``, which
    XLA:CPU runs element by element (it cost ~25% of a DPO step at vocabulary 8k,
    benchmarks/vs_trl.py). Same cotangent (one non-zero per row); forward mode and higher
    orders (WDPO) work as for any JAX function."""
    return jnp.take_along_axis(x, labels[..., None], axis=-1)[..., 0]


@_picked.defjvp
def _picked_jvp(primals, tangents):
    x, labels = primals
    x_dot, _ = tangents
    iota = jax.lax.broadcasted_iota(labels.dtype, x.shape, x.ndim - 1)
    # linear in x_dot; its transpose (reverse mode) is a dense select, not a scatter
    return _picked(x, labels), jnp.sum(jnp.where(iota == labels[..., None], x_dot, 0.0), axis=-1)


def sequence_logps(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of response-token log-probs and the number of response tokens per sequence.

    Args:
      logits: [B, T, V], any float dtype (upcast to float32 internally).
      labels: [B, T] int, already shifted so ``logits[:, t]`` predicts ``labels[:, t]``.
      mask:   [B, T] {0, 1}; 1 on response tokens only (never prompt or padding).
    Returns:
      ``(sum_logps [B] float32, n_tokens [B] float32)``.
    """
    lp = token_logps(logits, labels, mask)
    return lp.sum(axis=-1), mask.astype(jnp.float32).sum(axis=-1)


def mean_logps(sum_logps: jax.Array, n_tokens: jax.Array) -> jax.Array:
    """Length-normalised log-probs ``S / |y|`` (0 for an empty response, never NaN)."""
    return sum_logps / jnp.maximum(n_tokens, 1.0)


def sequence_logps_wpo(logits: jax.Array, labels: jax.Array, mask: jax.Array):
    """``sequence_logps`` plus WPO's per-sequence log-weight term (Zhou et al. 2024).

    ``ā(y) = (1/|y|) Σ_t m_t [ℓ_t − log Σ_v π(v | x, y_<t)²]`` with the stable form
    ``log Σ_v p_v² = logsumexp(2z) − 2·logsumexp(z)`` (no ``p²`` materialised), detached.
    Returns ``(sum_logps [B], n_tokens [B], wpo_logw [B])``.
    """
    check_logits_labels(logits, labels, mask)
    valid = mask.astype(bool)
    x = jnp.where(valid[..., None], logits.astype(jnp.float32), 0.0)
    safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
    lse = jax.nn.logsumexp(x, axis=-1)
    lp = jnp.where(valid, _picked(x, safe_labels) - lse, 0.0)
    log_sum_p2 = jax.nn.logsumexp(2.0 * x, axis=-1) - 2.0 * lse
    n = mask.astype(jnp.float32).sum(axis=-1)
    adj = jnp.where(valid, jax.lax.stop_gradient(lp) - jax.lax.stop_gradient(log_sum_p2), 0.0)
    return lp.sum(axis=-1), n, adj.sum(axis=-1) / jnp.maximum(n, 1.0)


def chunked_sequence_logps(hidden: jax.Array, head_fn, labels: jax.Array, mask: jax.Array, *,
                           chunk_size: int, with_wpo: bool = False):
    """:func:`sequence_logps` (or :func:`sequence_logps_wpo`) from the LM head's *input*, never
    materialising the ``[B, T, V]`` logits or their float32 log-softmax.

    The sequence is cut into chunks of ``chunk_size`` positions; a ``lax.scan`` applies
    ``head_fn(h [B, c, d]) -> logits [B, c, V]`` and the log-softmax to one chunk at a time
    under ``jax.checkpoint``, so both the forward and the backward hold ``[B, c, V]`` at a time
    (the backward recomputes each chunk's logits from its hidden states). Same values as the
    unchunked functions up to float summation order.

    Args:
      hidden: [B, T, d], already aligned with ``labels`` (position ``t`` predicts ``labels[t]``).
      head_fn: the model's hidden -> logits map (e.g. ``model.logits_from_hidden``).
      labels, mask: [B, T] as in :func:`sequence_logps`.
    """
    B, T = labels.shape
    if hidden.shape[:2] != (B, T):
        raise ValueError(f"hidden shape {tuple(hidden.shape)} does not match labels [B, T] = {(B, T)}")
    if mask.shape != labels.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match labels shape {tuple(labels.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    c = min(int(chunk_size), T)
    pad = (-T) % c
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        labels, mask = jnp.pad(labels, ((0, 0), (0, pad))), jnp.pad(mask, ((0, 0), (0, pad)))
    n_chunks = (T + pad) // c
    xs = (hidden.reshape(B, n_chunks, c, -1).swapaxes(0, 1),
          labels.reshape(B, n_chunks, c).swapaxes(0, 1),
          mask.reshape(B, n_chunks, c).swapaxes(0, 1))

    @jax.checkpoint
    def chunk(h, lab, m):
        logits = head_fn(h)
        if with_wpo:
            s, n, w = sequence_logps_wpo(logits, lab, m)
            return s, w * jnp.maximum(n, 1.0)  # un-normalised WPO sum, normalised at the end
        s, _ = sequence_logps(logits, lab, m)
        return s, jnp.zeros_like(s)

    def body(carry, x):
        s, w = chunk(*x)
        return (carry[0] + s, carry[1] + w), None

    zeros = jnp.zeros((B,), jnp.float32)
    (s, w), _ = jax.lax.scan(body, (zeros, zeros), xs)
    n = mask.astype(jnp.float32).sum(axis=-1)
    if with_wpo:
        return s, n, w / jnp.maximum(n, 1.0)
    return s, n
