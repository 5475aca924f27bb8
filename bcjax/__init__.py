"""bcjax: Model Breadcrumbs and multi-task model merging in JAX/Flax.

The core (this namespace) is pure functions over pytrees; see ../shared/SPEC.md for the
exact semantics every function follows.
"""
from bcjax import errors
from bcjax.masks import breadcrumbs_from_mergekit, breadcrumbs_from_official, breadcrumbs_mask
from bcjax.merging import (MergeMethod, enable_compilation_cache, get_method, map_merged_leaves, merge, methods,
                           register_method, unregister_method)
from bcjax import regmean as _regmean  # noqa: F401  (registers "regmean")
from bcjax.adamerging import adamerging, load_coefficients
from bcjax.tree import (apply_task_vector, keystr, leaf_paths, make_leaf_filter, task_vector,
                        validate_models)

__version__ = "0.1.0"

__all__ = [
    "errors",
    "task_vector",
    "apply_task_vector",
    "breadcrumbs_mask",
    "breadcrumbs_from_mergekit",
    "breadcrumbs_from_official",
    "merge",
    "enable_compilation_cache",
    "methods",
    "get_method",
    "register_method",
    "unregister_method",
    "MergeMethod",
    "map_merged_leaves",
    "make_leaf_filter",
    "keystr",
    "leaf_paths",
    "validate_models",
    "adamerging",
    "load_coefficients",
]
