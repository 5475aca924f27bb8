"""Offline fixtures for tests, notebooks' CI mode and smoke runs — not used by the library:
:mod:`~bcjax.testing.synthetic` (a tiny in-memory model suite, ``suite: {name: synthetic}``),
:mod:`~bcjax.testing.clip_tiny` (a tiny CLIP and image data sets), :mod:`~bcjax.testing.t5_offline`
(a tiny T5 and GLUE-shaped data)."""
