"""Execution backends, discovered through the ``i3d.backends`` entry-point group."""
