"""The grid of an ablation: ``--grid KEY=V1,V2`` flags -> axes -> cells, with their folder
names; and the ``--folds`` / ``--seeds`` / ``--reference`` flags.

A grid is the cartesian product of its axes, in the order the flags were given (the first
axis varies slowest): ``--grid optim.name=adamw,sam --grid loss.name=uncertainty,dice_ce``
gives the four cells ``optim.name=adamw,loss.name=uncertainty``,
``optim.name=adamw,loss.name=dice_ce``, ``optim.name=sam,loss.name=uncertainty`` and
``optim.name=sam,loss.name=dice_ce``. A key is any dotted configuration key
(:mod:`uumamba.config`); values are separated by commas outside brackets and quotes
(``model.features=[8,16,32],[16,32,64]`` has two values) and each is parsed as YAML, as
``--set`` parses its value. A cell is run with the configuration's ``--set`` overrides plus
its own ``KEY=VALUE`` pairs.

A cell's folder name (its *slug*) joins ``KEY-VALUE`` pairs with ``__``
(``optim.name-adamw__loss.name-uncertainty``), every run of characters other than letters,
digits and ``._+-`` in a value replaced by ``-``; slugs longer than :data:`MAX_SLUG`
characters are shortened and end in a hash of the cell's label.

Everything here parses text and raises :class:`~uumamba.errors.UserError` naming the flag and
the rule broken; nothing reads a file (the configurations of the cells are validated by
:func:`uumamba.ablation.run.make_request`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from uumamba.config import MAX_OVERRIDE_CHARS, parse_yaml
from uumamba.errors import UserError

#: Longest folder name of a cell; longer ones are cut and end in 10 hex digits of a hash.
MAX_SLUG = 120
#: Most cells a grid may have (the product of its axes' lengths).
MAX_CELLS = 1000
#: Largest ``--seeds`` value (``train.seed`` seeds numpy, which takes 32-bit seeds).
MAX_SEED = 2**32 - 1
#: Unicode categories refused in a cell value: control characters (C0, DEL, C1), format
#: characters (bidirectional overrides, zero-width ones) and line / paragraph separators.
_CONTROL_CATEGORIES = ("Cc", "Cf", "Zl", "Zp")

#: Keys that a grid may not vary, with the reason (and the flag that sets them instead).
RESERVED_KEYS: dict[str, str] = {
    "train.seed": "the seed is set by --seeds",
    "train.time_limit_minutes": "the time budget is set by --minutes, the same for every cell",
    "train.n_folds": "every cell must use the same split; set it with --set",
}
#: Sections a grid may not vary: every cell must train and be scored on the same data and
#: classes (set them with ``--set``).
RESERVED_SECTIONS: tuple[str, ...] = ("dataset",)

#: Settings the plan (``plans.json``: spacing, patch, batch, topology) is made from besides
#: the data: a cell that varies one of them plans its own model folders; every other cell
#: uses the ablation's one shared plan.
PLAN_KEYS: tuple[str, ...] = ("model.spatial_dims", "model.features", "model.base_features",
                              "model.max_features")
PLAN_SECTIONS: tuple[str, ...] = ("plan",)

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_DIGITS = re.compile(r"[0-9]+")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_PATH_CHARACTERS = ("/", "\\", "..")


@dataclass(frozen=True)
class Axis:
    """One ``--grid`` flag.

    Attributes:
        key: the dotted configuration key (``optim.name``).
        texts: the values as given (whitespace around each stripped), in order.
        values: the same values parsed as YAML.
    """

    key: str
    texts: tuple[str, ...]
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Cell:
    """One combination of grid values.

    Attributes:
        settings: ``(key, value text)`` per axis, in the grid's order.
        values: the parsed values, same order.
    """

    settings: tuple[tuple[str, str], ...]
    values: tuple[Any, ...]

    @property
    def label(self) -> str:
        """``key=value,key=value`` (what ``--reference`` accepts and the report shows)."""
        return ",".join(f"{k}={v}" for k, v in self.settings)

    @property
    def slug(self) -> str:
        """The cell's folder name under ``OUTPUT/cells/`` (see the module docstring)."""
        slug = "__".join(f"{k}-{_UNSAFE.sub('-', v).strip('-') or 'empty'}"
                         for k, v in self.settings)
        if len(slug) > MAX_SLUG:
            digest = hashlib.sha256(self.label.encode()).hexdigest()[:10]
            slug = f"{slug[:MAX_SLUG - 11].rstrip('-_.')}-{digest}"
        return slug

    @property
    def plans_itself(self) -> bool:
        """The cell varies a setting of :data:`PLAN_KEYS` / :data:`PLAN_SECTIONS`, so the
        shared plan does not fit it: its model folders are planned on their own."""
        return any(k in PLAN_KEYS or k.split(".", 1)[0] in PLAN_SECTIONS
                   for k, _ in self.settings)

    def overrides(self) -> list[str]:
        """The cell's ``KEY=VALUE`` overrides (applied after the base ``--set`` ones)."""
        return [f"{k}={v}" for k, v in self.settings]


def split_values(text: str) -> list[str]:
    """Split at commas outside ``[]`` / ``{}`` / quotes; each piece stripped.

    ``"adamw,sam"`` -> ``["adamw", "sam"]``; ``"[8,16],[16,32]"`` -> ``["[8,16]", "[16,32]"]``.
    Unbalanced brackets or quotes are left to the YAML parser to refuse.
    """
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def check_config_key(key: str, flag: str, item: str) -> None:
    """Refuse a key that is not a dotted setting of :class:`uumamba.config.Config`.

    Raises:
        UserError: ``"<flag> <item>: ..."`` naming the unknown part.
    """
    from uumamba.config import Config

    if not _KEY.match(key):
        raise UserError(f"{flag} {item}: {key!r} is not a dotted config key such as "
                        "optim.name")
    model: type[BaseModel] | None = Config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth])
        if model is None:
            raise UserError(f"{flag} {item}: '{where}' is a setting, not a section")
        field = model.model_fields.get(part)
        if field is None:
            known = ", ".join(sorted(model.model_fields))
            place = f"section '{where}'" if where else "the configuration"
            raise UserError(f"{flag} {item}: unknown config key '{key}' ({place} has: {known})")
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) \
            else None
    if model is not None:
        raise UserError(f"{flag} {item}: '{key}' is a section; give one of its keys, e.g. "
                        f"{key}.{next(iter(model.model_fields))}")


def _control(text: str) -> str | None:
    """The first control, format or line-separator character of ``text`` (None: none)."""
    return next((c for c in text if unicodedata.category(c) in _CONTROL_CATEGORIES), None)


def _refuse_controls(text: str, flag: str) -> None:
    """Refuse a whole flag value with a control character anywhere (before any stripping:
    Python strips some of them, such as U+0085, as whitespace), shown escaped."""
    bad = _control(text)
    if bad is not None:
        raise UserError(f"{flag} {text!r}: contains the control character U+{ord(bad):04X}; "
                        "cell values name folders, so control characters are not allowed")


def _parse_value(text: str, flag: str, item: str) -> Any:
    if not text:
        raise UserError(f"{flag} {item}: empty value (values are separated by single commas)")
    bad = next((c for c in _PATH_CHARACTERS if c in text), None)
    if bad is not None or _control(text) is not None:
        shown = repr(bad) if bad is not None else "a control character"
        raise UserError(f"{flag} {item}: value {text!r} contains {shown}; cell values name "
                        "folders, so '/', '\\', '..' and control characters are not allowed")
    if len(text) > MAX_OVERRIDE_CHARS:
        raise UserError(f"{flag} {item[:60]}...: a value of {len(text)} characters, more than "
                        f"{MAX_OVERRIDE_CHARS}")
    try:
        return parse_yaml(text)  # no anchors / aliases: they expand exponentially
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{flag} {item}: value {text!r} is not valid YAML ({first})") from None


def parse_axis(item: str) -> Axis:
    """One ``--grid KEY=V1,V2,...`` flag.

    Raises:
        UserError: a control, format or line-separator character anywhere in ``item``
            (shown escaped); no ``=``; a key that is not a config key, reserved
            (:data:`RESERVED_KEYS`, :data:`RESERVED_SECTIONS`) or a whole section; no value,
            more than :data:`MAX_CELLS` values, an empty value, a value with path characters
            or invalid YAML; a value given twice (equal :func:`canonical` JSON once parsed;
            values that differ as YAML but give the same configuration are refused by
            :func:`uumamba.ablation.run.make_request`).
    """
    flag = "--grid"
    _refuse_controls(item, flag)
    if "=" not in item:
        raise UserError(f"{flag} {item!r}: expected KEY=VALUE1,VALUE2,... e.g. "
                        "optim.name=adamw,sam")
    key, raw = (s.strip() for s in item.split("=", 1))
    check_config_key(key, flag, item)
    if key in RESERVED_KEYS:
        raise UserError(f"{flag} {item}: {key} cannot vary in a grid: {RESERVED_KEYS[key]}")
    section = key.split(".", 1)[0]
    if section in RESERVED_SECTIONS:
        raise UserError(f"{flag} {item}: '{section}' settings cannot vary in a grid: every cell "
                        "trains and is scored on the same data and classes (use --set)")
    if not raw:
        raise UserError(f"{flag} {item}: no value; give one or more, e.g. {key}=A,B")
    texts = split_values(raw)
    if len(texts) > MAX_CELLS:
        raise UserError(f"{flag} {key}=...: {len(texts)} values; a grid has at most "
                        f"{MAX_CELLS} cells")
    values = [_parse_value(t, flag, item) for t in texts]
    seen: dict[str, int] = {}
    for i, value in enumerate(values):
        j = seen.setdefault(canonical(value), i)
        if j != i:
            raise UserError(f"{flag} {item}: value {texts[i]!r} is given twice"
                            + ("" if texts[i] == texts[j] else f" (as {texts[j]!r})"))
    return Axis(key, tuple(texts), tuple(values))


def canonical(value: Any) -> str:
    """A parsed value (or a configuration dump) as canonical JSON: equal text, equal value
    (``1`` and ``1.0`` differ; YAML dates and other non-JSON scalars by their ``repr``)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)


def parse_grid(items: list[str]) -> list[Axis]:
    """All ``--grid`` flags, in order.

    Raises:
        UserError: no flag; any of :func:`parse_axis`'s; one key in two flags.
    """
    if not items:
        raise UserError("--grid: give at least one, e.g. --grid optim.name=adamw,sam")
    axes: list[Axis] = []
    for item in items:
        axis = parse_axis(item)
        if any(a.key == axis.key for a in axes):
            raise UserError(f"--grid {item}: {axis.key} is already a grid axis; give all its "
                            f"values in one flag ({axis.key}=A,B)")
        axes.append(axis)
    return axes


def cells_of(axes: list[Axis]) -> list[Cell]:
    """The cartesian product of the axes (first axis slowest).

    Raises:
        UserError: more than :data:`MAX_CELLS` cells (checked before they are built); two
            cells get the same folder name (values that differ only in characters the slug
            replaces).
    """
    n_cells = math.prod(len(a.texts) for a in axes)
    if n_cells > MAX_CELLS:
        sizes = " x ".join(str(len(a.texts)) for a in axes)
        raise UserError(f"--grid: {sizes} = {n_cells} cells; a grid has at most {MAX_CELLS} "
                        "(give fewer values)")
    cells = []
    for combo in itertools.product(*(range(len(a.texts)) for a in axes)):
        cells.append(Cell(tuple((a.key, a.texts[i]) for a, i in zip(axes, combo, strict=True)),
                          tuple(a.values[i] for a, i in zip(axes, combo, strict=True))))
    seen: dict[str, Cell] = {}
    for cell in cells:
        other = seen.setdefault(cell.slug, cell)
        if other is not cell:
            raise UserError(f"--grid: cells {other.label} and {cell.label} get the same folder "
                            f"name {cell.slug!r}; use values that differ in letters or digits")
    return cells


def parse_int_list(text: str, flag: str, maximum: int | None = None) -> list[int]:
    """``"0,1"`` -> ``[0, 1]``: comma-separated integers >= 0 (ASCII digits only), none twice,
    none above ``maximum``.

    Raises:
        UserError: an empty list or item, a non-integer or negative item, an item above
            ``maximum``, a repeated item.
    """
    text = str(text)
    shown = text if text.isprintable() and len(text) <= 80 else repr(text[:80])
    items = [t.strip() for t in text.split(",")]
    if not any(items):
        raise UserError(f"{flag} {text!r}: give one or more integers, e.g. {flag} 0,1")
    out: list[int] = []
    seen: set[int] = set()
    for t in items:
        if not _DIGITS.fullmatch(t):
            raise UserError(f"{flag} {shown}: {t[:30]!r} is not an integer >= 0 "
                            f"(comma-separated digits 0-9, e.g. {flag} 0,1)")
        if len(t.lstrip("0")) > 20 or (maximum is not None and int(t) > maximum):
            limit = "" if maximum is None else f" (at most {maximum})"
            raise UserError(f"{flag} {shown}: {t[:30]}{'...' if len(t) > 30 else ''} is too "
                            f"large{limit}")
        value = int(t)
        if value in seen:
            raise UserError(f"{flag} {shown}: {value} is given twice")
        seen.add(value)
        out.append(value)
    return out


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: ``train.seed`` values in ``0 .. MAX_SEED``.

    Raises:
        UserError: as :func:`parse_int_list`.
    """
    return parse_int_list(text, "--seeds", maximum=MAX_SEED)


def parse_folds(text: str, n_folds: int) -> list[int]:
    """``--folds``: fold indices in ``0 .. n_folds - 1`` (``train.n_folds``).

    Raises:
        UserError: as :func:`parse_int_list`; ``all`` (no validation cases to score); a fold
            out of range.
    """
    if str(text).strip().lower() == "all":
        raise UserError("--folds all: fold 'all' has no validation cases to score; give fold "
                        f"indices, e.g. --folds 0,1 (0..{n_folds - 1})")
    folds = parse_int_list(text, "--folds")
    bad = [f for f in folds if f >= n_folds]
    if bad:
        raise UserError(f"--folds {text}: fold {bad[0]} does not exist; train.n_folds = "
                        f"{n_folds} gives folds 0..{n_folds - 1}")
    return folds


def find_reference(cells: list[Cell], text: str | None) -> Cell:
    """``--reference``: a cell's slug, or ``key=value,...`` pairs naming exactly one cell
    (values compared after YAML parsing; keys not given may take any value only if one cell
    is left). None: the first cell.

    Raises:
        UserError: a key that is not a grid axis or is given twice, a malformed pair (pairs separated by spaces
            instead of commas: the message shows the comma form), no cell matching (the message
            lists the grid's values per key) or several (it lists them).
    """
    if text is None or not text.strip():
        return cells[0]
    _refuse_controls(text, "--reference")
    text = text.strip()
    for cell in cells:
        if text in (cell.slug, cell.label):
            return cell
    keys = [k for k, _ in cells[0].settings]
    pairs = split_values(text)
    if any(re.search(r"\s\S+=", pair.split("=", 1)[-1]) for pair in pairs):
        fixed = re.sub(r"\s*,?\s+(?=[^\s=,]+=)", ",", text)
        raise UserError(f"--reference {text}: separate KEY=VALUE pairs with commas, e.g. "
                        f"--reference {fixed}")
    wanted: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--reference {text}: {pair!r} is neither KEY=VALUE nor a cell's "
                            f"folder name (cells: {', '.join(c.slug for c in cells)})")
        key, raw = (s.strip() for s in pair.split("=", 1))
        if key not in keys:
            raise UserError(f"--reference {text}: {key} is not a --grid key (keys: "
                            f"{', '.join(keys)})")
        if key in wanted:
            raise UserError(f"--reference {text}: {key} is given twice; give one value per "
                            "grid key")
        wanted[key] = _parse_value(raw, "--reference", text)
    matches = [c for c in cells
               if all(dict(zip(keys, c.values, strict=True))[k] == v for k, v in wanted.items())]
    if not matches:
        values = "; ".join(f"{k}: {', '.join(dict.fromkeys(c.settings[i][1] for c in cells))}"
                           for i, k in enumerate(keys))
        raise UserError(f"--reference {text}: no cell of the grid matches (the grid's values: "
                        f"{values})")
    if len(matches) > 1:
        raise UserError(f"--reference {text}: {len(matches)} cells match "
                        f"({'; '.join(c.label for c in matches)}); give a value for every grid "
                        f"key ({', '.join(keys)})")
    return matches[0]
