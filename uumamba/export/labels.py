"""Label names for export: from a ``--labels`` string, a model folder or a dataset.json.

Accepted forms (mirroring the dataset.json conventions users bring from nnU-Net and MSD):

- ``"1=RV,2=MYO,3=LV"`` — value=name pairs, comma separated;
- a model folder (``MODEL/dataset.json``, written by ``uumamba train``) or a dataset.json
  path. Both dataset.json label layouts are read: value -> name (MSD / nnU-Net v1,
  ``{"labels": {"0": "background", "1": "RV"}}``) and name -> value (nnU-Net v2,
  ``{"labels": {"background": 0, "RV": 1}}``). nnU-Net v2 region labels (a list of values
  for one name) are refused: a region is not one label value;
- nothing: every value found in the mask is named ``label_N``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from uumamba.data.labels import read_dataset_labels
from uumamba.errors import UserError


def default_labels(values: Iterable[int]) -> dict[int, str]:
    """``{v: "label_v"}`` for every non-zero value (the names used when none are given)."""
    return {int(v): f"label_{int(v)}" for v in sorted(set(values)) if int(v) != 0}


def parse_label_pairs(spec: str) -> dict[int, str]:
    """Parse ``"1=RV,2=MYO,3=LV"`` into ``{1: "RV", 2: "MYO", 3: "LV"}``.

    Raises:
        UserError: an item is not ``VALUE=NAME``, a value is not a non-negative integer, a
            name is empty, or a value repeats.
    """
    labels: dict[int, str] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        value_text, sep, name = item.partition("=")
        value_text, name = value_text.strip(), name.strip()
        if not sep or not name or not value_text.isdigit():
            raise UserError(
                f"--labels: {item!r} is not VALUE=NAME with a non-negative integer VALUE "
                "(expected e.g. '1=RV,2=MYO,3=LV')"
            )
        value = int(value_text)
        if value in labels:
            raise UserError(f"--labels: value {value} is given twice ({labels[value]!r}, {name!r})")
        labels[value] = name
    if not labels:
        raise UserError(f"--labels: no VALUE=NAME pairs in {spec!r}")
    return labels


def labels_from_dataset_json(path: str | Path) -> dict[int, str]:
    """Read the ``labels`` mapping of a dataset.json (either form) as value -> name
    (:func:`uumamba.data.labels.read_dataset_labels`).

    Raises:
        UserError: the file is missing, not JSON, has no ``labels`` object, or holds region
            labels / non-integer values.
    """
    labels = read_dataset_labels(path)
    if not labels:
        raise UserError(f"labels file {path} has no 'labels' object")
    return labels


def resolve_labels(spec: str | None, mask_values: Iterable[int]) -> dict[int, str]:
    """Turn a ``--labels`` argument into value -> name (see the module docstring).

    Args:
        spec: ``None``, ``"VALUE=NAME,..."``, a model folder or a dataset.json path.
        mask_values: the values present in the mask (used only when ``spec`` is None).

    Raises:
        UserError: ``spec`` names no existing folder / file and is not VALUE=NAME pairs, a
            model folder has no dataset.json, or the pairs / file are malformed.
    """
    if spec is None or not spec.strip():
        return default_labels(mask_values)
    path = Path(spec).expanduser()
    if path.is_dir():
        from uumamba.model_folder import ModelFolder

        labels = ModelFolder(path).dataset_labels()
        if not labels:
            raise UserError(f"--labels: model folder {path} has no dataset.json with labels")
        return labels
    if path.is_file():
        return labels_from_dataset_json(path)
    if "=" in spec:
        return parse_label_pairs(spec)
    raise UserError(
        f"--labels: {spec!r} is neither VALUE=NAME pairs (e.g. '1=RV,2=MYO,3=LV') nor an "
        "existing model folder / dataset.json"
    )
