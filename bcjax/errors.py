"""Exception types raised by bcjax.

All derive from :class:`BcjaxError` (itself a :class:`ValueError`, so code that catches
``ValueError`` keeps working). Messages name the offending key path and model index.
"""


class BcjaxError(ValueError):
    """Base class of every error bcjax raises on bad input."""


class TreeMismatchError(BcjaxError):
    """A fine-tuned tree (or a Fisher tree) does not match the pretrained tree's
    structure, shapes or dtypes (SPEC §1)."""


class NonFiniteError(BcjaxError):
    """An input leaf holds NaN or Inf (SPEC §1)."""


class HyperparameterError(BcjaxError):
    """A hyper-parameter is outside its domain (e.g. β > γ, density ≤ 0, NaN, an array
    where a scalar is expected); the message names the method and the argument
    (:mod:`bcjax.hparams`)."""


class HyperparameterTypeError(HyperparameterError, TypeError):
    """A hyper-parameter is not of an accepted type: a string (YAML 1.1 reads ``9e-1`` as
    one), ``None``, a bool, a complex number, an integer where a PRNG key is needed
    (:mod:`bcjax.hparams`). Also a ``TypeError``."""


class UnknownMethodError(BcjaxError, KeyError):
    """``merge`` was asked for a method name that is not registered."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class EmptyModelListError(BcjaxError):
    """A merge was asked for with no fine-tuned models."""


class EvaluationDataError(BcjaxError):
    """Per-example evaluation data (correctness arrays, labels, subset indicators) are
    malformed or inconsistent; the message names the method, task and array (SPEC §4
    "Uncertainty")."""


class SingularGramError(BcjaxError):
    """RegMean's Σt G̃t for a kernel is singular (SPEC §3); the message names the key path
    and suggests ``jitter`` > 0."""


class DataAccessError(BcjaxError):
    """A method read data it must not read: labels during unsupervised adaptation
    (AdaMerging, SPEC §3) — the analogue of the engine's guard on test reads while tuning."""


class MissingDependencyError(BcjaxError, ImportError):
    """An optional dependency is not installed (or is an incompatible version); the
    message names the package and the extra to install, e.g. ``pip install 'bcjax[train]'``."""


class CheckpointError(BcjaxError):
    """A checkpoint on disk is missing, unreadable, or does not match the base model
    (names, shapes, dtypes, values); the message names the file and the tensor (SPEC §7)."""


class OverflowMergeError(NonFiniteError):
    """Every input is finite but the merged value of some entry lies outside the θ0 leaf's
    dtype (e.g. |θ*| > 65504 for float16): SPEC §1 never returns a silent Inf. The message
    names the method and the key path."""


class DeviceMismatchError(BcjaxError):
    """Models (or leaves) are committed to different devices, so no single computation can
    read them; the message names the model index, the key path and both device sets."""


class ComplexLeafWarning(UserWarning):
    """A complex leaf takes no part in a merge (SPEC §1: only real floating leaves are merged)
    and is copied from θ0; the warning names the key paths."""


class CacheWarning(RuntimeWarning):
    """A cached artefact (native kernel, fine-tune checkpoint, results line) failed its
    integrity check and is rebuilt or skipped; the warning names the file or folder."""
