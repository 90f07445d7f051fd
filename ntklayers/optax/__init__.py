"""NTK monitoring and step-size control as optax gradient transformations.

* :func:`monitor` records NTK metrics (``λmax``, ``κ``, trace, ...) of the
  current parameters on a probe batch every ``every`` steps, with a ring-buffer
  history, leaving the updates unchanged.
* :func:`step_size_guard` scales the updates so the step stays below a safety
  fraction of the NTK stability bound of gradient descent for the loss trained
  (``2N/λmax`` for MSE, ``loss="softmax_cross_entropy"`` for cross-entropy); a
  non-finite measurement keeps the last safe scale and is counted.
* :func:`monitor_values`, :func:`monitor_history` and :func:`monitor_state` read
  a monitor's state out of an optimizer state (e.g. of ``optax.chain``);
  ``optax.tree_utils.tree_get(opt_state, "lambda_max")`` works as well.

Both transformations need ``params``: ``opt.update(grads, opt_state, params)``,
and the whole model's: chain them outside ``optax.multi_transform`` /
``optax.masked``.
Requires optax (``pip install optax``).

Example:
  >>> import haiku as hk, jax, jax.numpy as jnp, optax, ntklayers, ntklayers.optax
  >>> net = hk.without_apply_rng(hk.transform(lambda x: ntklayers.Linear(2)(x)))
  >>> x = jnp.ones((4, 3)); params = net.init(jax.random.key(0), x)
  >>> opt = optax.chain(optax.adam(1e-3),
  ...                   ntklayers.optax.monitor(net.apply, x, every=5, history=8))
  >>> state = opt.init(params)
  >>> @jax.jit
  ... def step(params, state):
  ...   grads = jax.grad(lambda p: jnp.sum(net.apply(p, x) ** 2))(params)
  ...   updates, state = opt.update(grads, state, params)
  ...   return optax.apply_updates(params, updates), state
  >>> for _ in range(12):
  ...   params, state = step(params, state)
  >>> ntklayers.optax.monitor_history(state)["step"].tolist()
  [0, 5, 10]
"""

try:
  import optax as _optax_lib  # noqa: F401  pylint: disable=unused-import
except ImportError as e:  # pragma: no cover
  raise ImportError("ntklayers.optax needs optax: pip install optax") from e

from ntklayers.optax._guard import NTKStepSizeGuardState
from ntklayers.optax._guard import step_size_guard
from ntklayers.optax._monitor import NTKMonitorState
from ntklayers.optax._monitor import monitor
from ntklayers.optax._monitor import monitor_history
from ntklayers.optax._monitor import monitor_state
from ntklayers.optax._monitor import monitor_values

__all__ = (
    "NTKMonitorState",
    "NTKStepSizeGuardState",
    "monitor",
    "monitor_history",
    "monitor_state",
    "monitor_values",
    "step_size_guard",
)
