"""Compatibility layers for other kernel libraries' users.

``ntklayers.compat.neural_tangents``: neural-tangents' empirical API (names,
signatures, defaults, argument order) on ntklayers' kernels, so that
``import ntklayers.compat.neural_tangents as nt`` runs typical neural-tangents
code unchanged. See ``docs/guides/migrating.md``.
"""
