"""NTK scores of candidate architectures at initialization (training-free NAS).

Score architectures before training them, from the exact finite-width NTK of
each candidate at initialization on a probe batch ``x [N, ...]`` (labels ``y``
optional). Glossary: ``N`` examples, ``O`` outputs per example, ``Θ`` the NTK.

=======================  ===============================================  ======
score                    definition                                       better
=======================  ===============================================  ======
``te_nas_kappa``         ``λmax/λmin`` of the ``[N, N]`` NTK of the       lower
                         summed logits over weight matrices (TE-NAS)
``kappa``                ``λmax/λmin`` of the full ``[N·O, N·O]`` NTK     lower
``trace_norm``           ``tr Θ = Σ_n Σ_o ‖∂f_o(x_n)/∂θ‖²`` (NASI),       higher
                         in memory linear in ``N``
``alignment``            ``⟨K, YYᵀ⟩ / (‖K‖ ‖YYᵀ‖)``, ``K`` the            higher
                         logit-averaged ``[N, N]`` NTK, ``Y`` one-hot
``centered_alignment``   the same with ``K`` and ``YYᵀ`` centered         higher
=======================  ===============================================  ======

``λmin <= 0`` gives ``κ = inf`` (never a substitute constant; TE-NAS's code
replaces NaN by ``1e5``, this module does not).

* Functions of ``f(params, x) -> [N, O]`` (a Haiku ``apply``, or a closure over
  a Flax module): :func:`te_nas_kappa`, :func:`te_nas_kernel`, :func:`kappa`,
  :func:`trace_norm`, :func:`label_alignment`; :func:`weights_only` is TE-NAS's
  parameter mask, for any ``ntk_fn(..., trainable=weights_only)``.
* :class:`Scorer`: a callback for any search loop. ``scorer(candidate)`` takes
  a Haiku function, an ``hk.Transformed``, a ``flax.linen`` module or an NNX
  constructor ``ctor(rngs)``, averages each score over ``repeats`` seeds
  (optionally over probe batches drawn from a pool), rejects early (non-finite,
  or TE-NAS ``κ`` above ``max_kappa``) and returns a :class:`ScoreResult`;
  ``scorer.rank(candidates, by=...)`` sorts them best first.

Example:
  >>> import haiku as hk, jax, ntklayers, ntklayers.nas
  >>> x = jax.random.normal(jax.random.key(0), (16, 8))
  >>> def mlp(x):
  ...   return ntklayers.Linear(4)(jax.nn.relu(ntklayers.Linear(32)(x)))
  >>> result = ntklayers.nas.Scorer(x, repeats=2)(mlp)
  >>> sorted(result.means), len(result.values["kappa"]), result.rejected
  (['kappa', 'te_nas_kappa', 'trace_norm'], 2, False)
  >>> net = hk.without_apply_rng(hk.transform(mlp))
  >>> params = net.init(jax.random.key(1), x)
  >>> float(ntklayers.nas.te_nas_kappa(net.apply, params, x)) > 1
  True

In a search loop, any mix of frameworks (each candidate compiles its kernels
once; ``repeats`` reuse them):

  >>> import flax.linen as nn
  >>> from flax import nnx
  >>> from ntklayers.flax import linen as ntk_nn, nnx as ntk_nnx
  >>> class Wide(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     return ntk_nn.Dense(4)(nn.relu(ntk_nn.Dense(64)(x)))
  >>> def narrow(rngs: nnx.Rngs):
  ...   return nnx.Sequential(ntk_nnx.Linear(8, 16, rngs=rngs), nnx.relu,
  ...                         ntk_nnx.Linear(16, 4, rngs=rngs))
  >>> scorer = ntklayers.nas.Scorer(x, x[:, 0] > 0, repeats=2, scores=(
  ...     "te_nas_kappa", "centered_alignment"))
  >>> results = {name: scorer(c) for name, c in
  ...            {"mlp": mlp, "wide": Wide(), "narrow": narrow}.items()}
  >>> best = min(results, key=lambda k: results[k].sort_key("te_nas_kappa"))
  >>> results[best].means["te_nas_kappa"] == min(
  ...     r.means["te_nas_kappa"] for r in results.values())
  True

TE-NAS's mask works with any kernel function, e.g.
``ntklayers.ntk_fn(f, trainable=ntklayers.nas.weights_only)``.

References:
  Chen, Gong, Wang, "Neural architecture search on ImageNet in four GPU hours:
  a theoretically inspired perspective" (TE-NAS), ICLR 2021. Shu et al.,
  "NASI: label- and data-agnostic neural architecture search at
  initialization", ICLR 2022. Cortes, Mohri, Rostamizadeh, "Algorithms for
  learning kernels based on centered alignment", JMLR 2012.
"""

from ntklayers.nas._scores import HIGHER_IS_BETTER
from ntklayers.nas._scores import SCORES
from ntklayers.nas._scores import WEIGHT_NAMES
from ntklayers.nas._scores import FallbackWarning
from ntklayers.nas._scores import Ranked
from ntklayers.nas._scores import ScoreResult
from ntklayers.nas._scores import kappa
from ntklayers.nas._scores import label_alignment
from ntklayers.nas._scores import te_nas_kappa
from ntklayers.nas._scores import te_nas_kernel
from ntklayers.nas._scores import trace_norm
from ntklayers.nas._scores import weights_only
from ntklayers.nas._scorer import Scorer

__all__ = (
    "HIGHER_IS_BETTER",
    "SCORES",
    "WEIGHT_NAMES",
    "FallbackWarning",
    "Ranked",
    "ScoreResult",
    "Scorer",
    "kappa",
    "label_alignment",
    "te_nas_kappa",
    "te_nas_kernel",
    "trace_norm",
    "weights_only",
)
