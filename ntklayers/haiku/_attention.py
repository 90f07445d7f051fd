"""Drop-in ``MultiHeadAttention`` whose projections are annotated ``Linear``s."""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from ntklayers.haiku._layers import Linear


class MultiHeadAttention(hk.MultiHeadAttention):
  """Drop-in for :class:`haiku.MultiHeadAttention`.

  Same constructor, parameter tree (``query``, ``key``, ``value`` and ``linear``
  projections) and outputs; the four projections are :class:`ntklayers.Linear`
  layers, so their parameters are contracted from factors (positions ``T`` are a
  weight-sharing axis). Self- and cross-attention, masks and
  ``value_size``/``model_size`` work as in Haiku.

  Glossary of shapes: ``T'`` query length, ``T`` key/value length, ``H`` heads,
  ``D`` embedding size.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers.haiku as nh
    >>> def f(x):
    ...   mha = nh.MultiHeadAttention(num_heads=2, key_size=4,
    ...                               w_init=hk.initializers.VarianceScaling())
    ...   return mha(x, x, x)
    >>> net = hk.without_apply_rng(hk.transform(f))
    >>> params = net.init(jax.random.key(0), jnp.ones((1, 5, 8)))
    >>> sorted(params)  # doctest: +NORMALIZE_WHITESPACE
    ['multi_head_attention/key', 'multi_head_attention/linear',
     'multi_head_attention/query', 'multi_head_attention/value']
  """

  def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array,
               mask: jax.Array | None = None) -> jax.Array:
    """Computes (optionally masked) MHA; see :meth:`haiku.MultiHeadAttention.__call__`.

    Args:
      query: ``[..., T', D_q]``.
      key: ``[..., T, D_k]``.
      value: ``[..., T, D_v]``.
      mask: optional ``[..., H=1, T', T]``.

    Returns:
      ``[..., T', D']``.
    """
    *leading_dims, sequence_length, _ = query.shape
    projection = self._linear_projection
    query_heads = projection(query, self.key_size, "query")
    key_heads = projection(key, self.key_size, "key")
    value_heads = projection(value, self.value_size, "value")
    attn_logits = jnp.einsum("...thd,...Thd->...htT", query_heads, key_heads)
    attn_logits = attn_logits / np.sqrt(self.key_size).astype(key.dtype)
    if mask is not None:
      if mask.ndim != attn_logits.ndim:
        raise ValueError(
            f"Mask dimensionality {mask.ndim} must match logits dimensionality "
            f"{attn_logits.ndim}.")
      attn_logits = jnp.where(mask, attn_logits, -1e30)
    attn_weights = jax.nn.softmax(attn_logits)
    attn = jnp.einsum("...htT,...Thd->...thd", attn_weights, value_heads)
    attn = jnp.reshape(attn, (*leading_dims, sequence_length, -1))
    final_projection = Linear(self.model_size, w_init=self.w_init,
                              with_bias=self.with_bias, b_init=self.b_init)
    return final_projection(attn)

  @hk.transparent
  def _linear_projection(self, x: jax.Array, head_size: int,
                         name: str | None = None) -> jax.Array:
    y = Linear(self.num_heads * head_size, w_init=self.w_init,
               with_bias=self.with_bias, b_init=self.b_init, name=name)(x)
    *leading_dims, _ = x.shape
    return y.reshape((*leading_dims, self.num_heads, head_size))
