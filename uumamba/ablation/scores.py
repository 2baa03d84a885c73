"""A run's ``scores.json`` (one owner for the file the child writes and the report reads) and
the bounded JSON reading of every file of an ablation's folder.

The child (:mod:`uumamba.ablation.child`) writes ``fold_K/scores.json`` last, so its presence
marks a run as done. It records, besides the scores, the run's cell, seed and fold and
:func:`config_digest` of the run's full resolved configuration; :func:`read_scores` accepts
the file only for the very run that asks (same cell, seed, fold and digest: a file copied
from another cell, or scored before the grid, budget or base configuration changed, is
refused rather than mixed into the report) and only when every value is in range:

- ``weights``: ``last``, the run's final weights (``checkpoint_latest.pt``); a file scored
  from ``checkpoint_best.pt`` (the child before 2026-12-06), chosen by the Dice of the very
  cases it scores, is refused, to be scored again;
- ``iterations`` / ``planned_iterations``: integers in ``0 .. 10**12 - 1``; ``seconds``: a
  finite number >= 0; ``stopped_by``: ``time_limit`` or ``completed``;
- ``classes``: the foreground class names, none twice; ``val_cases``: the fold's validation
  cases, exactly (none twice);
- ``per_case``: exactly one row ``{"case", "class", "dice", "hd95_mm"}`` per validation case
  and class; ``dice`` None or finite in ``[0, 1]``, ``hd95_mm`` None or finite >= 0;
- ``foreground_mean_dice`` / ``postprocessed_foreground_mean_dice``: None or in ``[0, 1]``.

Every JSON file of an ablation is read through :func:`read_json`, which refuses anything but
a regular file of at most :data:`MAX_JSON_BYTES` bytes before decoding it (and, but in
``scores.json``, whose schema names the field, JSON's non-standard ``NaN`` / ``Infinity``);
:func:`check_json_size` bounds the files that other modules parse. Nothing here imports
torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from uumamba.errors import DataError, printable, shown

#: Name of the file that marks a run as done (in the fold folder).
SCORES = "scores.json"
#: Largest JSON file of an ablation's folder that is read (``scores.json``, ``grid.json``,
#: ``splits.json``, ``plans.json``).
MAX_JSON_BYTES = 64 * 2**20
#: Iteration counts at or above this are not a run's.
MAX_ITERATIONS = 10**12

_UnitFloat = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
_Distance = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
_Count = Annotated[int, Field(ge=0, lt=MAX_ITERATIONS)]


def check_json_size(path: str | Path, limit: int = MAX_JSON_BYTES) -> None:
    """Refuse a path that is not a regular file of at most ``limit`` bytes (for JSON files
    another module parses, such as ``splits.json`` and ``plans.json``).

    Raises:
        DataError: ``"<path>: ..."`` (missing, not a regular file, too large).
    """
    path = Path(path)
    try:
        info = path.stat()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    _check_stat(path, info, limit)


def _check_stat(path: Path, info: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"{path}: not a regular file")
    if info.st_size > limit:
        raise DataError(f"{path}: {info.st_size} bytes, more than the {limit} a file of an "
                        "ablation may have")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def read_json(path: str | Path, limit: int = MAX_JSON_BYTES, allow_nan: bool = False) -> Any:
    """The JSON value in ``path``, read only if it is a regular file of at most ``limit``
    bytes (checked on the open file, before reading); strict JSON (no ``NaN`` /
    ``Infinity``) unless ``allow_nan`` (then they are floats, for a schema to refuse by
    field name).

    Raises:
        DataError: ``"<path>: ..."``: missing or unreadable, not a regular file, too large,
            not UTF-8, not JSON.
    """
    path = Path(path)
    check_json_size(path, limit)  # before opening: a FIFO would block the open itself
    try:
        with path.open("rb") as fh:
            _check_stat(path, os.fstat(fh.fileno()), limit)
            raw = fh.read(limit + 1)
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > limit:
        raise DataError(f"{path}: more than the {limit} bytes a file of an ablation may have")
    try:
        text = raw.decode("utf-8")
        return json.loads(text) if allow_nan else json.loads(text, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        first = " ".join(str(exc).split())[:200]
        raise DataError(f"{path}: not valid JSON ({first})") from None


def config_digest(cfg: Any) -> str:
    """SHA-256 (hex) of a validated configuration's canonical JSON (``model_dump``, sorted
    keys): equal digests, equal settings."""
    text = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


class ScoreRow(BaseModel):
    """One case and class of a run's ``per_case`` list."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)

    case: str
    class_: str = Field(alias="class")
    dice: _UnitFloat | None
    hd95_mm: _Distance | None


class RunScores(BaseModel):
    """The fields of ``scores.json`` the report reads (others are ignored)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    cell: str
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)]
    fold: Annotated[int, Field(ge=0)]
    config_hash: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    weights: Literal["last"]
    iterations: _Count
    planned_iterations: _Count
    seconds: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
    stopped_by: Literal["time_limit", "completed"]
    classes: Annotated[list[str], Field(min_length=1)]
    val_cases: Annotated[list[str], Field(min_length=1)]
    per_case: list[ScoreRow]
    foreground_mean_dice: _UnitFloat | None
    postprocessed_foreground_mean_dice: _UnitFloat | None = None


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    where = printable(".".join(str(p) for p in e["loc"]))[:80] or "(top level)"
    more = f" (and {err.error_count() - 1} more problem(s))" if err.error_count() > 1 else ""
    return f"{where}: {e['msg']}{more}"


def read_scores(path: str | Path, *, cell: str, seed: int, fold: int, config_hash: str,
                val_cases: list[str]) -> dict[str, Any]:
    """A run's ``scores.json``, validated for that run (see the module docstring).

    Args:
        path: the file.
        cell / seed / fold: the run (its cell's label).
        config_hash: :func:`config_digest` of the run's configuration.
        val_cases: the fold's validation cases in the ablation's ``splits.json``.

    Returns:
        The validated fields (``per_case`` rows with the key ``class``).

    Raises:
        DataError: ``"<path>: <field>: ..."``, naming the first field that is wrong and how
            to recover (delete the file to score the run again, or the cell's folder to
            retrain it).
    """
    path = Path(path)
    rescore = "delete it to score the run again"
    data = read_json(path, allow_nan=True)  # a NaN is refused by the schema, naming the field
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a run's scores (expected a JSON object); {rescore}")
    weights = data.get("weights")
    if weights is None or weights == "best":  # before the schema: say why, not "Field required"
        got = "'best'" if weights == "best" else "not recorded"
        raise DataError(f"{path}: weights: {got}: scored, as before 2026-12-06, from "
                        "checkpoint_best.pt, chosen by the Dice of the same validation cases, "
                        f"not from the run's final weights (checkpoint_latest.pt); {rescore}")
    if weights != "last":
        raise DataError(f"{path}: weights: {shown(weights)} is not 'last' (the only value this "
                        f"version writes); {rescore}")
    try:
        scores = RunScores.model_validate(data)
    except ValidationError as err:
        raise DataError(f"{path}: {_first_error(err)}; {rescore}") from None
    for name, want in (("cell", cell), ("seed", seed), ("fold", fold)):
        got = getattr(scores, name)
        if got != want:
            raise DataError(f"{path}: {name}: {shown(got) if isinstance(got, str) else got} is not this run's ({want!r}); the file "
                            f"belongs to another run: {rescore}")
    if scores.config_hash != config_hash:
        raise DataError(f"{path}: config_hash: the run was scored with other settings; delete "
                        "the cell folder to retrain")
    if len(set(scores.classes)) != len(scores.classes):
        raise DataError(f"{path}: classes: a class is named twice "
                        f"({shown(', '.join(scores.classes), 80)}); {rescore}")
    if len(set(scores.val_cases)) != len(scores.val_cases):
        raise DataError(f"{path}: val_cases: a case is named twice; {rescore}")
    if sorted(scores.val_cases) != sorted(val_cases):
        raise DataError(f"{path}: val_cases: scored cases "
                        f"{shown(', '.join(sorted(scores.val_cases)[:5]), 80)} are not "
                        f"fold {fold}'s validation cases of the ablation's splits.json; every "
                        "run must use the same split (delete the cell folder to retrain)")
    classes, cases = set(scores.classes), set(scores.val_cases)
    seen: set[tuple[str, str]] = set()
    for i, row in enumerate(scores.per_case):
        if row.class_ not in classes:
            raise DataError(f"{path}: per_case.{i}.class: {shown(row.class_)} is not one of "
                            f"classes {shown(', '.join(scores.classes), 80)}; {rescore}")
        if row.case not in cases:
            raise DataError(f"{path}: per_case.{i}.case: {shown(row.case)} is not one of val_cases; "
                            f"{rescore}")
        if (row.case, row.class_) in seen:
            raise DataError(f"{path}: per_case.{i}: case {shown(row.case)} class {shown(row.class_)} is "
                            f"scored twice; {rescore}")
        seen.add((row.case, row.class_))
    if len(seen) != len(cases) * len(classes):
        raise DataError(f"{path}: per_case: {len(seen)} row(s), expected one per validation case "
                        f"and class ({len(cases)} x {len(classes)}); {rescore}")
    return scores.model_dump(by_alias=True)
