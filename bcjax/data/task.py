"""The one task type every data adapter returns (SPEC §4): a classification task with the
splits ``train`` / ``val`` / ``test`` (:data:`SPLITS`), each ``(inputs, labels)`` with labels
``int32[N]`` class indices into ``class_names``.

``inputs`` is whatever the model family reads: float32 or uint8 NHWC images (the offline
DINOv2 suite, :mod:`bcjax.data.suite`), a lazy :class:`bcjax.data.vision.ImageArray` (CLIP),
or prompt strings (GLUE for T5, :mod:`bcjax.data.glue`). Sources with other split names map
them here, at the loader boundary (GLUE's own ``validation`` split is our ``test``; our
``val`` is carved from its train split). Per-example columns beyond the label (GLUE's row
``idx``, STS-B's gold scores) live in ``columns[split]``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from bcjax.errors import BcjaxError

__all__ = ["Task", "SPLITS", "LABEL_DTYPE"]

#: Split names, in order: every task has exactly these.
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: The dtype of every task's labels.
LABEL_DTYPE = np.dtype(np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """One classification task.

    Attributes:
      name: the task's name (results keys, reports).
      class_names: one name per class; labels index it.
      splits: ``{"train" | "val" | "test": (inputs, labels)}``, ``len(inputs) == len(labels)``,
        labels ``int32[N]`` in ``[0, num_classes)``. Array inputs share their per-example
        shape across splits.
      templates: zero-shot prompt templates with ``{c}`` for the class name (CLIP heads).
      columns: ``{split: {column: array[N]}}``, further per-example values (e.g. GLUE's
        ``idx`` and STS-B's ``scores``).
      provenance, license: where the data come from, under which licence.
    """

    name: str
    class_names: tuple[str, ...]
    splits: Mapping[str, tuple[Any, np.ndarray]]
    templates: tuple[str, ...] = ()
    columns: Mapping[str, Mapping[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    provenance: str = ""
    license: str = ""

    def __post_init__(self):
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "templates", tuple(self.templates))
        if set(self.splits) != set(SPLITS):
            raise BcjaxError(f"Task {self.name!r}: splits must be {SPLITS}, got {tuple(self.splits)}")
        shape = None
        for split in SPLITS:
            x, y = self.splits[split]
            if not isinstance(y, np.ndarray) or y.dtype != LABEL_DTYPE or y.ndim != 1 or len(x) != y.shape[0]:
                raise BcjaxError(f"Task {self.name!r}/{split}: labels must be int32 ({len(x)},) like the inputs, "
                                 f"got {getattr(y, 'dtype', type(y).__name__)} {getattr(y, 'shape', '')}")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(self.class_names)):
                raise BcjaxError(f"Task {self.name!r}/{split}: labels outside [0, {len(self.class_names)})")
            if hasattr(x, "shape"):
                if shape is not None and tuple(x.shape[1:]) != shape:
                    raise BcjaxError(f"Task {self.name!r}: split {split!r} inputs are {tuple(x.shape[1:])} per "
                                     f"example, other splits {shape}")
                shape = tuple(x.shape[1:])
            for col, v in (self.columns.get(split) or {}).items():
                if len(v) != len(y):
                    raise BcjaxError(f"Task {self.name!r}/{split}: column {col!r} has {len(v)} values for "
                                     f"{len(y)} examples")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def resolution(self) -> int | None:
        """The side of square image inputs (``[N, R, R, C]``), else None."""
        x = self.splits["train"][0]
        return int(x.shape[1]) if hasattr(x, "shape") and len(x.shape) == 4 else None

    @property
    def sizes(self) -> dict[str, int]:
        """Number of examples per split."""
        return {k: int(len(self.splits[k][1])) for k in SPLITS}

    def __repr__(self):
        return (f"Task(name={self.name!r}, num_classes={self.num_classes}, "
                f"resolution={self.resolution}, sizes={self.sizes})")
