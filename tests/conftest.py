"""Test-wide JAX settings.

* ``jax_enable_x64``: the exactness tests compare against the reference in
  float64 (rel. err. <= 1e-10); float32 tests pass explicit float32 inputs, and
  Haiku creates parameters in the input dtype.
* ``jax_numpy_dtype_promotion="strict"`` and ``jax_numpy_rank_promotion="raise"``
  (as in equinox's test suite): neither ntklayers nor the Haiku layers used here
  may rely on implicit dtype or rank promotion. The one known exception is in
  Haiku itself: ``hk.BatchNorm(is_training=True)`` updates its moving averages
  with ``jnp.power(float_decay, int32_counter)``, so the BatchNorm descriptors in
  ``tests/models.py`` trace that model under a local
  ``jax.numpy_dtype_promotion("standard")``.

``pyproject.toml`` turns every warning into an error; tests that expect one of
ntklayers' own warnings use ``pytest.warns``.

Compilation dominates the suite's run time on CPU (hundreds of tiny programs), so
XLA's backend (LLVM) optimization level is lowered to 0 unless ``XLA_FLAGS``
already chooses one: this cuts compile time about 4x and does not change the
floating-point semantics that the exactness tests check.

The two tiers. ``python -m pytest -n 2 -m 'not slow' tests`` (the README's
command, at most 6 minutes on 2 cores) runs every test function, and of each
parametrized one a deterministic sample: one parametrization in ``STRIDE`` (at
least one), chosen by a hash of the function's name so that different functions
sample different models and options. The rest are marked ``slow`` here at
collection, beside the tests marked ``slow`` in their files (larger models, long
fuzzer runs), and ``python -m pytest -n 2 -m slow tests`` runs them all (CI runs
both tiers). ``STRIDES`` keeps more of a few matrices; ``HEAVY`` moves single
long tests whose class another default test covers (named beside each).

``jax_num_cpu_devices=2``: the CPU backend exposes two devices (so that sharded
inputs and parameters can be tested); it must be set before the backend
initializes, i.e. before any array is created, which is why it is set here, at
import time of the first conftest. Computations still run on the default
(first) device unless a test places them elsewhere.
"""

import collections
import os
import zlib

import pytest

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


STRIDE = 64
# {test function: stride}: matrices the default tier keeps more of (1: all).
STRIDES = {
    "test_kernel_matches_reference": 12,  # the registry's exactness
    "test_fuzz_examples": 5,
    "test_architecture_names_every_module": 1,  # reads a file: no compilation
    "test_modules_are_private_behind_all": 1,
}
# Single long tests (over ~4 s alone on one core, measured with --durations) that
# run in the slow tier; a lighter test of the same class stays in the default tier.
HEAVY = frozenset({
    # large kernels: test_kill9_at_each_point, test_blocked.py (2 devices, resume)
    "test_kill9_at_random_points", "test_two_processes_resume_a_damaged_file",
    "test_resume_after_interrupt_is_byte_identical",
    "test_four_devices", "test_two_processes", "test_haiku_state_closed_over",
    "test_batch_axis_traced_pytree_inputs",
    # fuzzers: their explicit examples (test_fuzz_implementations) and unit tests
    "test_fuzz_blocked", "test_fuzz_metrics",
    # neural-tangents snippets: test_readme_stax_workflow and test_compat_nt.py
    "test_readme_flax", "test_readme_haiku_and_ntk_vector_products",
    "test_batch_snippet_and_no_divisibility", "test_pytree_outputs_one_kernel_per_leaf",
    # metrics and estimators: test_matches_eigvalsh_of_the_kernel, test_top_eigenpairs_match_eigh
    "test_metric_check_monitor_and_guard_agree", "test_real_kernel_is_j_jt_and_metrics_agree",
    "test_hutch_plus_plus_beats_hutchinson", "test_float32_and_random_key", "test_jittable",
    # kernels and adapters: the registry sample, test_flax_api.py, test_exactness.py
    "test_outer_layer_sharing_a_stacked_layers_name_stays_structured",
    "test_linen_only_params_move", "test_weights_only_nnx_state_names_and_kernel",
    "test_linen_apply_kwargs_pass_through", "test_spies_see_framework_internals",
    "test_capture_contract_without_jit", "test_cnn_haiku_linen_nnx_same_kernel",
    "test_nnx_layer_norm_axes_variants_exact", "test_nnx_attention_children_are_left_untouched",
    # applications: test_lsuv_unit_variance_per_layer, test_nas.py's scorer tests, the CLI demo
    "test_scan_over_a_shared_layer_is_judged_on_all_steps",
    "test_search_loop_and_rank_with_rejections", "test_bench_prints_the_table",
    "test_correlation_table_of_synthetic_rows", "test_quick_run_writes_table_and_plot",
    # more of the same: a lighter sibling of each stays (second measurement, 2 cores)
    "test_required_warning_once", "test_scanned_six_block_transformer_is_structured_and_exact",
    "test_top_eigenpairs_match_eigh", "test_runtime_error_exits_1_with_one_line",
    "test_batch_axis_traced_with_masks_and_kwargs", "test_gd_on_the_linearized_ce_dynamics",
    "test_the_documented_demo_output_is_what_the_demo_prints",
    "test_calibrate_moves_scale_to_target_and_lowers_kappa",
    "test_ce_training_between_the_bounds_converges_and_the_check_is_quiet",
    "test_compiled_temp_memory_does_not_grow_with_n", "test_repeats_are_deterministic_per_seed",
    "test_fingerprint_costs_no_trace", "test_trace_norm_is_the_trace_and_linear_in_memory",
    "test_bound_is_exact_for_the_linearized_model", "test_nnx_model_state_and_dict",
    "test_guard_does_not_scale_a_ce_step_below_the_ce_bound", "test_zoo_weights_are_shared",
    "test_loss_normalization", "test_unrecognized_layers_warn_once", "test_lsuv_is_deterministic",
    "test_scales_are_applied_per_layer",
    # single tests over ~3 s on one core (pytest --durations=0, 2 cores): each file keeps
    # its lighter tests of the same class in the default tier
    "test_alignment_and_diagonal_trace_of_dicts", "test_calibrate_linen_groups",
    "test_capture_contract_equals_kernel_fn",
    "test_capture_probe_once_contract_against_two_batches", "test_check_trainability_reports_nan",
    "test_closed_over_numpy_array_and_scalar", "test_closed_over_prng_key",
    "test_contract_caches_from_different_models", "test_demo_writes_pngs_and_exits_zero",
    "test_embed_jacobian_route_when_cheaper", "test_heatmap",
    "test_inspect_rejects_bad_inputs_like_the_kernel", "test_layerwise_names_of_nested_modules",
    "test_linen_method_kwarg", "test_linen_nested_apply_kwargs",
    "test_linen_no_retrace_on_second_call_with_same_shapes", "test_linen_ntk_of_linearized_model",
    "test_lobpcg_matches_eigh", "test_lsuv_unit_variance_per_layer",
    "test_masked_conv_falls_back_with_warning_and_is_exact", "test_matches_eigvalsh_of_the_kernel",
    "test_model_kwargs_key_is_traced", "test_module_entry_point_help",
    "test_monitor_values_match_direct_computation",
    "test_monitor_with_trace_axes_keeps_the_other_metrics", "test_monte_carlo",
    "test_multiplicity_found_by_the_block",
    "test_non_finite_kernels_give_nan_never_a_finite_value", "test_nonfinite_operator_gives_nan",
    "test_ntk_of_the_linearized_model_is_the_ntk_at_the_expansion_point",
    "test_ntk_trace_with_masks_and_kwargs", "test_params_and_flops_of_an_mlp",
    "test_polynomial_is_exact_at_its_degree", "test_pytree_outputs_model_kwargs_and_grad",
    "test_readme_stax_workflow", "test_rng_split_per_side", "test_slq_moments",
    "test_trainable_mask", "test_training_is_deterministic_and_learns",
    "test_vectors_and_model_kwargs",
})


@pytest.hookimpl(tryfirst=True)  # before the -m selection reads the marks
def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  """Marks the default tier's complement ``slow`` (see the module docstring)."""
  groups = collections.defaultdict(list)
  for item in items:
    if item.get_closest_marker("slow"):
      continue
    node = item.nodeid.split("[")[0]
    if node.rsplit("::", 1)[-1] in HEAVY:
      item.add_marker(pytest.mark.slow)
    elif getattr(item, "callspec", None) is not None:
      groups[node].append(item)
  for node, group in groups.items():
    name = node.rsplit("::", 1)[-1]
    stride = STRIDES.get(name, STRIDE)
    keep = zlib.crc32(name.encode()) % min(stride, len(group))
    for i, item in enumerate(group):
      if i % stride != keep:
        item.add_marker(pytest.mark.slow)
