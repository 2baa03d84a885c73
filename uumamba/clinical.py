"""Clinical indices of one patient from an end-diastolic (ED) and an end-systolic (ES) label
mask: ventricular volumes, stroke volume, ejection fraction and myocardial mass.

Per ventricle (LV and RV cavity), in the units of the CSV / JSON fields:

- ``EDV_ml`` / ``ESV_ml``: cavity volume at ED / ES in mL = voxel count x voxel volume, with
  the voxel volume = product of the three spacings in mm / 1000
  (:func:`uumamba.evaluation.metrics.label_volumes`, the one volume implementation);
- ``SV_ml`` = EDV - ESV (mL);
- ``EF_pct`` = 100 x (EDV - ESV) / EDV (%);
- ``MYO_mass_g``: myocardial mass at ED = myocardium volume at ED (mL) x 1.05 g/mL.

The density 1.05 g/mL and the ED phase for the mass are the ACDC challenge's (Bernard et al.,
"Deep Learning Techniques for Automatic MRI Cardiac Multi-structures Segmentation and
Diagnosis: Is the Problem Solved?", IEEE TMI 37(11):2514-2525, 2018, Sec. II), as in the SCMR
post-processing recommendations (Schulz-Menger et al., JCMR 2020;22:19). Volumes are slice
summation of the mask (Simpson's rule without interpolation between slices), which is what
the expert contours of ACDC measure too.

Indexed to body surface area (``..i_ml_m2``, ``MYO_massi_g_m2``) when height and weight are
known: BSA (m^2) = sqrt(height (cm) x weight (kg) / 3600), Mosteller, "Simplified calculation
of body-surface area", N Engl J Med 1987;317(17):1098.

Undefined values are ``None`` (JSON ``null``, empty CSV cell) with the reason in
``undefined[field]``, never NaN: SV and EF when the cavity is empty at ED or at ES (a mask
without the cavity is a failed segmentation, not a ventricle that emptied), an RV index when
the label set has no RV, the mass when there is no myocardium, indexed values without height
and weight.

Labels are given roles by name (:func:`label_roles`): ACDC's ``1 RV, 2 MYO, 3 LV`` and the
usual spellings (``LV``, ``left ventricle``, ``LV cavity`` / ``blood pool``, ``myocardium``
...). A label set without an LV cavity is refused: no index can be computed.

Pairing ED with ES (:func:`pair_phases`): a ``--pairs`` CSV (:func:`read_pairs_csv`) when
given; else ACDC names ``patientXXX_frameNN`` grouped by patient, ED / ES from ``Info.cfg``
(:func:`read_info_cfg`) when present, else ED = the frame with the largest LV volume and ES =
the one with the smallest; every record says which in ``pairing``.

This module computes and reads; it never prints. Writing is :func:`write_clinical`
(atomic). Errors are :class:`uumamba.errors.DataError` naming the file and the rule.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uumamba.errors import DataError
from uumamba.evaluation.metrics import label_volumes
from uumamba.utils import atomic_path, json_safe, read_regular

#: Myocardial tissue density in g/mL (ACDC challenge; SCMR recommendations).
MYOCARDIAL_DENSITY_G_PER_ML = 1.05
BSA_FORMULA = ("Mosteller: BSA (m^2) = sqrt(height_cm * weight_kg / 3600) "
               "(N Engl J Med 1987;317(17):1098)")

#: Per-patient indices, in CSV column order.
INDEX_FIELDS: tuple[str, ...] = (
    "LV_EDV_ml", "LV_ESV_ml", "LV_SV_ml", "LV_EF_pct",
    "RV_EDV_ml", "RV_ESV_ml", "RV_SV_ml", "RV_EF_pct", "MYO_mass_g",
)
#: BSA-indexed indices (present when height and weight are known).
INDEXED_FIELDS: tuple[str, ...] = (
    "LV_EDVi_ml_m2", "LV_ESVi_ml_m2", "LV_SVi_ml_m2",
    "RV_EDVi_ml_m2", "RV_ESVi_ml_m2", "RV_SVi_ml_m2", "MYO_massi_g_m2",
)
_INDEXED_FROM = {f: f.replace("i_ml_m2", "_ml").replace("massi_g_m2", "mass_g")
                 for f in INDEXED_FIELDS}
#: Decimals of every index (mL, %, g and their BSA-indexed values): far below what a mask
#: resolves (a voxel is ~0.02 mL), and e.g. an SV of 58.84 rather than 58.84000000000002.
INDEX_DECIMALS = 4

#: Normalised label names for each role (lower case, letters and digits only).
ROLE_NAMES: dict[str, frozenset[str]] = {
    "LV": frozenset({"lv", "lvc", "lvcavity", "lvbloodpool", "lvblood", "leftventricle",
                     "leftventricular", "leftventricularcavity", "leftventriclecavity",
                     "leftventricularbloodpool", "lvendo", "lvendocardium"}),
    "RV": frozenset({"rv", "rvc", "rvcavity", "rvbloodpool", "rvblood", "rightventricle",
                     "rightventricular", "rightventricularcavity", "rightventriclecavity",
                     "rightventricularbloodpool", "rvendo"}),
    "MYO": frozenset({"myo", "myocardium", "myocard", "lvmyo", "lvmyocardium", "lvm",
                      "leftventricularmyocardium", "leftventriclemyocardium", "lvwall"}),
}

# Hostile-input caps for Info.cfg and pairs CSV files.
INFO_CFG_MAX_BYTES = 4096
INFO_CFG_MAX_LINES = 64
PAIRS_CSV_MAX_BYTES = 1 << 20
PAIRS_CSV_MAX_ROWS = 10_000
_CASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_ACDC_CASE = re.compile(r"^(patient\d+)_frame(\d+)$")
_INFO_LIMITS = {"Height": (30.0, 250.0), "Weight": (2.0, 350.0)}  # cm, kg
_INFO_INT_KEYS = ("ED", "ES", "NbFrame")


def _normalise(name: str) -> str:
    return "".join(c for c in str(name).lower() if c.isalnum())


@dataclass(frozen=True)
class LabelRoles:
    """Which label name plays which role (names as in the label map)."""

    lv: str
    rv: str | None
    myo: str | None


def label_roles(labels: Mapping[int, str]) -> LabelRoles:
    """Map a label set (value -> name) to LV cavity, RV cavity and myocardium by name.

    Names are compared lower-cased with everything but letters and digits removed, against
    :data:`ROLE_NAMES` (so ``"LV"``, ``"left ventricle"``, ``"LV_cavity"`` are all the LV).

    Raises:
        DataError: no label is the LV cavity (clinical indices need it), or two labels claim
            one role; the message lists the label set.
    """
    found: dict[str, str] = {}
    for value, name in sorted(labels.items()):
        if value == 0:
            continue
        key = _normalise(name)
        for role, names in ROLE_NAMES.items():
            if key in names:
                if role in found:
                    raise DataError(f"labels {dict(labels)}: both {found[role]!r} and {name!r} "
                                    f"name the {role}; clinical indices need one label per role")
                found[role] = name
    if "LV" not in found:
        raise DataError(f"labels {dict(labels)} have no LV cavity label (recognised names: "
                        "LV, left ventricle, LV cavity, LV blood pool ...); clinical indices "
                        "(volumes, EF, mass) cannot be computed for this label set")
    return LabelRoles(lv=found["LV"], rv=found.get("RV"), myo=found.get("MYO"))


@dataclass(frozen=True)
class PatientInfo:
    """What ACDC's ``Info.cfg`` says about a patient (each field ``None`` when absent).

    Attributes:
        height_cm / weight_kg: body height in cm and weight in kg.
        ed_frame / es_frame: frame numbers of ED and ES (``patientXXX_frameNN``).
        group: ACDC diagnosis group (NOR, DCM, HCM, MINF, RV).
        source: the file it was read from.
        n_frames: ``NbFrame``, the number of time points of the patient's cine series.
    """

    height_cm: float | None = None
    weight_kg: float | None = None
    ed_frame: int | None = None
    es_frame: int | None = None
    group: str | None = None
    source: str | None = None
    n_frames: int | None = None


def _read_small_text(path: Path, max_bytes: int, what: str) -> str:
    """The UTF-8 text of a small untrusted file (a leading byte-order mark dropped), reading
    at most ``max_bytes + 1`` bytes.

    Raises:
        DataError: unreadable, larger than ``max_bytes``, or not UTF-8; names the file.
    """
    try:
        raw = read_regular(path, max_bytes + 1)  # a FIFO or a device is refused, not read
    except OSError as exc:
        raise DataError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if len(raw) > max_bytes:
        raise DataError(f"{path}: {what} is larger than {max_bytes} bytes")
    try:
        return raw.decode("utf-8-sig")  # utf-8, minus a Windows editor's byte-order mark
    except UnicodeDecodeError:
        raise DataError(f"{path}: {what} is not UTF-8 text") from None


#: A decimal number as Info.cfg writes them (no underscores, no inf / nan words, no hex).
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d{1,3})?")


def read_info_cfg(path: str | Path) -> PatientInfo:
    """Read an ACDC ``Info.cfg`` (``Key: value`` lines: ED, ES, Group, Height, Weight, NbFrame).

    Treated as untrusted: at most :data:`INFO_CFG_MAX_BYTES` bytes and
    :data:`INFO_CFG_MAX_LINES` lines of UTF-8 text; every non-blank line is ``Key: value``;
    a key appears once (a leading byte-order mark is ignored); ED / ES / NbFrame are integers
    0-9999 and ED differs from ES; Height 30-250 (cm) and Weight 2-350 (kg) plain decimal
    numbers; Group at most 16 letters or digits. Unknown keys are ignored.

    Raises:
        DataError: a rule is broken; the message names the file, the line and the rule.
    """
    path = Path(path)
    text = _read_small_text(path, INFO_CFG_MAX_BYTES, "Info.cfg")
    lines = text.splitlines()
    if len(lines) > INFO_CFG_MAX_LINES:
        raise DataError(f"{path}: Info.cfg has more than {INFO_CFG_MAX_LINES} lines")
    values: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if ":" not in line:
            raise DataError(f"{path}: line {number} is not 'Key: value'")
        key, value = (s.strip() for s in line.split(":", 1))
        if key in values:
            raise DataError(f"{path}: line {number}: key {key[:32]!r} is given twice")
        values[key] = value
    fields: dict[str, Any] = {}
    for key in _INFO_INT_KEYS:
        if key in values:
            v = values[key]
            if not (v.isascii() and v.isdigit() and len(v) <= 4):
                raise DataError(f"{path}: {key} {v[:32]!r} is not an integer frame number 0-9999")
            fields[key] = int(v)
    for key, (low, high) in _INFO_LIMITS.items():
        if key in values:
            if not _PLAIN_NUMBER.fullmatch(values[key]):  # float() also takes '1_00', 'inf'
                raise DataError(f"{path}: {key} {values[key][:32]!r} is not a number")
            v = float(values[key])
            if not (math.isfinite(v) and low <= v <= high):
                unit = "cm" if key == "Height" else "kg"
                raise DataError(f"{path}: {key} {values[key][:32]!r} is outside {low:g}-{high:g} {unit}")
            fields[key] = v
    if fields.get("ED") is not None and fields.get("ED") == fields.get("ES"):
        raise DataError(f"{path}: ED and ES are the same frame ({fields['ED']}); they must differ")
    group = values.get("Group")
    if group is not None and not (group.isascii() and group.isalnum() and len(group) <= 16):
        raise DataError(f"{path}: Group {group[:32]!r} is not at most 16 letters or digits")
    return PatientInfo(height_cm=fields.get("Height"), weight_kg=fields.get("Weight"),
                       ed_frame=fields.get("ED"), es_frame=fields.get("ES"), group=group,
                       source=str(path), n_frames=fields.get("NbFrame"))


def body_surface_area(height_cm: float, weight_kg: float) -> float:
    """Body surface area in m^2 by Mosteller's formula, sqrt(height_cm * weight_kg / 3600).

    Source: R. D. Mosteller, N Engl J Med 1987;317(17):1098. E.g. 180 cm, 80 kg -> 2.0 m^2.

    Raises:
        ValueError: a value that is not finite and positive.
    """
    h, w = float(height_cm), float(weight_kg)
    if not (math.isfinite(h) and math.isfinite(w) and h > 0 and w > 0):
        raise ValueError(f"body_surface_area: height {height_cm!r} cm and weight {weight_kg!r} "
                         "kg must be finite and positive")
    return math.sqrt(h * w / 3600.0)


def phase_volumes(mask: np.ndarray, spacing: Sequence[float], labels: Mapping[int, str]
                  ) -> dict[str, float]:
    """Volume in mL of every foreground label of one phase's mask (label name -> mL).

    ``mask`` is an (x, y, z) integer label map, ``spacing`` the voxel size in mm; computed by
    :func:`uumamba.evaluation.metrics.label_volumes`.
    """
    return label_volumes(mask, spacing, dict(labels))[1]


def indices_from_volumes(ed: Mapping[str, float], es: Mapping[str, float], roles: LabelRoles,
                         info: PatientInfo | None = None) -> dict[str, Any]:
    """Clinical indices from per-label volumes (mL) at ED and ES; see the module docstring.

    Args:
        ed, es: label name -> volume in mL of each phase (e.g. :func:`phase_volumes`, or the
            predictor's ``volumes_ml``); a role's label missing from a mapping counts as 0 mL.
        roles: :func:`label_roles` of the label set.
        info: height / weight for the BSA-indexed values (and the group, copied).

    Returns:
        ``{<each of INDEX_FIELDS and INDEXED_FIELDS>: float | None (rounded to
        INDEX_DECIMALS decimals), "bsa_m2", "bsa_formula",
        "height_cm", "weight_kg", "group", "undefined": {field: reason}, "warnings": [...]}``.
    """
    out: dict[str, Any] = {}
    undefined: dict[str, str] = {}
    warnings: list[str] = []
    for side, name in (("LV", roles.lv), ("RV", roles.rv)):
        fields = [f"{side}_{k}" for k in ("EDV_ml", "ESV_ml", "SV_ml", "EF_pct")]
        if name is None:
            for f in fields:
                out[f] = None
                undefined[f] = f"the label set has no {side} cavity label"
            continue
        edv, esv = float(ed.get(name, 0.0)), float(es.get(name, 0.0))
        out[fields[0]], out[fields[1]] = edv, esv
        if edv <= 0.0 or esv <= 0.0:
            phase = "ED" if edv <= 0.0 else "ES"
            reason = (f"no {side} voxels at {phase} ({name!r} is empty there: a failed "
                      "segmentation, not a measurable cavity)")
            out[fields[2]] = out[fields[3]] = None
            undefined[fields[2]] = undefined[fields[3]] = reason
            continue
        out[fields[2]] = edv - esv
        out[fields[3]] = 100.0 * (edv - esv) / edv
        if esv > edv:
            warnings.append(f"{side} ESV {esv:.1f} mL is larger than EDV {edv:.1f} mL (EF "
                            f"{out[fields[3]]:.1f} %): ED and ES may be swapped or a phase "
                            "mis-segmented")
    if ed and dict(ed) == dict(es):
        warnings.append("ED and ES have identical volumes for every label: the same image given "
                        "twice? (EF 0 is then meaningless)")
    if roles.myo is None:
        out["MYO_mass_g"] = None
        undefined["MYO_mass_g"] = "the label set has no myocardium label"
    elif float(ed.get(roles.myo, 0.0)) <= 0.0:
        out["MYO_mass_g"] = None
        undefined["MYO_mass_g"] = f"no myocardium voxels at ED ({roles.myo!r} is empty there)"
    else:
        out["MYO_mass_g"] = float(ed[roles.myo]) * MYOCARDIAL_DENSITY_G_PER_ML
    height = info.height_cm if info else None
    weight = info.weight_kg if info else None
    bsa = body_surface_area(height, weight) if height and weight else None
    for f in INDEXED_FIELDS:
        base = out[_INDEXED_FROM[f]]
        if bsa is None:
            out[f] = None
            undefined[f] = ("height and weight unknown (no Info.cfg): BSA not available"
                            if info is None else
                            f"{Path(info.source).name if info.source else 'Info.cfg'} gives no "
                            "Height and Weight: BSA not available")
        elif base is None:
            out[f] = None
            undefined[f] = undefined[_INDEXED_FROM[f]]
        else:
            out[f] = base / bsa
    for f in (*INDEX_FIELDS, *INDEXED_FIELDS):  # the subtraction's float noise removed
        if isinstance(out[f], float):
            out[f] = round(out[f], INDEX_DECIMALS)
    out.update({"bsa_m2": bsa, "bsa_formula": BSA_FORMULA if bsa is not None else None,
                "height_cm": height, "weight_kg": weight, "group": info.group if info else None,
                "undefined": undefined, "warnings": warnings})
    return out


def clinical_indices(ed_mask: np.ndarray, es_mask: np.ndarray, ed_spacing: Sequence[float],
                     es_spacing: Sequence[float], labels: Mapping[int, str],
                     info: PatientInfo | None = None) -> dict[str, Any]:
    """Clinical indices of one patient from its ED and ES label masks.

    Args:
        ed_mask, es_mask: (x, y, z) integer label maps (may differ in shape).
        ed_spacing, es_spacing: voxel size in mm of each mask (x, y, z).
        labels: value -> name of the label set (roles by :func:`label_roles`).
        info: height / weight (BSA indexing) and group; optional.

    Returns:
        As :func:`indices_from_volumes`.

    Raises:
        DataError: the label set has no LV cavity (:func:`label_roles`).
    """
    roles = label_roles(labels)
    return indices_from_volumes(phase_volumes(ed_mask, ed_spacing, labels),
                                phase_volumes(es_mask, es_spacing, labels), roles, info)


# ------------------------------------------------------------------ pairing ED with ES

@dataclass(frozen=True)
class PhasePair:
    """The ED and ES case of one patient and how they were paired.

    Attributes:
        patient: patient id (ACDC ``patientXXX``, or the pairs CSV's ``patient``).
        ed / es: case ids of the two phases.
        pairing: how: ``"Info.cfg"``, ``"pairs CSV"``, ``"larger LV volume"`` (no
            Info.cfg: ED = the frame with the largest LV volume, ES = the smallest), or
            ``"LV volume curve"`` (the same over the frames of a split 4D series).
        info: the patient's Info.cfg, when read.
        warnings: what the pairing saw that the record must carry (e.g. frames left out of
            an LV volume curve, an Info.cfg whose NbFrame is not the series').
    """

    patient: str
    ed: str
    es: str
    pairing: str
    info: PatientInfo | None = None
    warnings: tuple[str, ...] = ()


def read_pairs_csv(path: str | Path) -> list[PhasePair]:
    """Read a pairs CSV with the columns ``case_ED``, ``case_ES``, ``patient`` (a header row,
    any column order, no other columns).

    Treated as untrusted: at most :data:`PAIRS_CSV_MAX_BYTES` bytes of UTF-8 and
    :data:`PAIRS_CSV_MAX_ROWS` rows; every cell a name of 1-200 characters from
    ``[A-Za-z0-9._-]`` starting with a letter or digit (no paths); a case appears in one row
    only, ED and ES differ, a patient appears once.

    Raises:
        DataError: a rule is broken; the message names the file, the row and the rule.
    """
    path = Path(path)
    text = _read_small_text(path, PAIRS_CSV_MAX_BYTES, "pairs CSV")
    if "\x00" in text:
        raise DataError(f"{path}: pairs CSV holds a NUL byte")
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        raise DataError(f"{path}: pairs CSV is malformed ({exc})") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    expected = ("case_ED", "case_ES", "patient")
    if not rows or sorted(c.strip() for c in rows[0]) != sorted(expected):
        raise DataError(f"{path}: the header row must be exactly the columns "
                        f"{', '.join(expected)} (any order)")
    if len(rows) - 1 > PAIRS_CSV_MAX_ROWS:
        raise DataError(f"{path}: pairs CSV has more than {PAIRS_CSV_MAX_ROWS} rows")
    column = {c.strip(): i for i, c in enumerate(rows[0])}
    pairs: list[PhasePair] = []
    seen_case: dict[str, int] = {}
    seen_patient: dict[str, int] = {}
    for number, row in enumerate(rows[1:], 2):
        if len(row) != 3:
            raise DataError(f"{path}: row {number} has {len(row)} cells, expected 3")
        cells = {c: row[i].strip() for c, i in column.items()}
        for name, value in cells.items():
            if not _CASE_NAME.match(value):
                raise DataError(f"{path}: row {number}: {name} {value[:40]!r} is not a case "
                                "name (1-200 characters of A-Z a-z 0-9 . _ -, no paths)")
        ed, es, patient = cells["case_ED"], cells["case_ES"], cells["patient"]
        if ed == es:
            raise DataError(f"{path}: row {number}: case_ED and case_ES are both {ed!r}")
        for case in (ed, es):
            if case in seen_case:
                raise DataError(f"{path}: row {number}: case {case!r} is already paired in "
                                f"row {seen_case[case]}")
            seen_case[case] = number
        if patient in seen_patient:
            raise DataError(f"{path}: row {number}: patient {patient!r} is already in row "
                            f"{seen_patient[patient]}")
        seen_patient[patient] = number
        pairs.append(PhasePair(patient, ed, es, "pairs CSV"))
    return pairs


def acdc_frames(case_ids: Iterable[str]) -> dict[str, dict[int, str]]:
    """Group ACDC case ids ``patientXXX_frameNN`` by patient: patient -> frame -> case id.
    Other names are left out.

    Raises:
        DataError: two cases of one patient have the same frame number (``frame01`` and
            ``frame1``).
    """
    out: dict[str, dict[int, str]] = {}
    for case in sorted(case_ids):
        m = _ACDC_CASE.match(case)
        if m:
            by_frame = out.setdefault(m.group(1), {})
            frame = int(m.group(2))
            if frame in by_frame:
                raise DataError(f"{m.group(1)}: cases {by_frame[frame]} and {case} are both frame "
                                f"{frame}; rename one or give a pairs CSV")
            by_frame[frame] = case
    return out


def acdc_patient(case: str) -> str | None:
    """The patient id of an ACDC case id ``patientXXX_frameNN`` (``patientXXX``), else None."""
    m = _ACDC_CASE.match(case)
    return m.group(1) if m else None


def cine_patient(case: str) -> str:
    """The patient id of a 4D (cine) input's case: ``case`` without ACDC's ``_4d`` suffix
    (``patient001_4d`` -> ``patient001``, whose Info.cfg numbers its frames)."""
    return case[:-3] if case.endswith("_4d") and len(case) > 3 else case


def pair_phases(case_ids: Iterable[str], lv_volume_ml: Callable[[str], float],
                pairs: Sequence[PhasePair] | None = None,
                info_for: Callable[[str], PatientInfo | None] | None = None,
                cines: Mapping[str, Sequence[str]] | None = None,
                no_anatomy: Iterable[str] = (),
                ) -> tuple[list[PhasePair], list[str]]:
    """Pair the ED and ES cases of each patient among ``case_ids``.

    Args:
        case_ids: the cases available (e.g. predicted masks).
        lv_volume_ml: case id -> LV volume in mL, used only without ``pairs`` and Info.cfg.
        pairs: rows of a pairs CSV (:func:`read_pairs_csv`); when given they alone decide.
        info_for: patient id -> its Info.cfg (or None); ACDC names, and the patients of
            ``cines``.
        cines: 4D inputs split into frames (``predict --split-4d``): input case -> its frames'
            case ids in time order (``CASE_frame00``, ...). Each is one record, named
            ``CASE`` (so a patient's 3D frames in the same folder keep their own), whose
            Info.cfg is :func:`cine_patient`'s. Its ED and ES are Info.cfg's frame numbers, which count
            from 1 as ACDC's do (``ED: 1`` is the first time point, ``CASE_frame00``), else
            the frames of the largest and the smallest LV volume (``"LV volume curve"``).
            Their frames are never paired by name: a split ``patient001.nii.gz`` gives
            ``patient001_frame00`` ..., whose numbers count from 0.
        no_anatomy: cases whose input is blank or constant; with the frames in which no LV
            was segmented, they are left out of an LV volume curve.

    Returns:
        (pairs found, sorted by patient; notes on the patients / cases that could not be
        paired, one line each, e.g. a patient with one phase only).
    """
    available = set(case_ids)
    notes: list[str] = []
    if pairs is not None:
        found = []
        for p in pairs:
            missing = [c for c in (p.ed, p.es) if c not in available]
            if missing:
                notes.append(f"{p.patient}: case(s) {', '.join(missing)} of the pairs CSV not found")
            else:
                found.append(p)
        return sorted(found, key=lambda p: p.patient), notes
    found, notes = _pair_cines(available, lv_volume_ml, cines or {}, info_for, set(no_anatomy))
    available -= {c for frames in (cines or {}).values() for c in frames}
    frames = acdc_frames(available)
    unpaired = sorted(available - {c for f in frames.values() for c in f.values()})
    if unpaired:
        notes.append(f"{len(unpaired)} case(s) not named patientXXX_frameNN (e.g. "
                     f"{unpaired[0]}): give a pairs CSV (case_ED, case_ES, patient) to pair them")
    for patient, by_frame in sorted(frames.items()):
        info = info_for(patient) if info_for is not None else None
        if info is not None and info.ed_frame is not None and info.es_frame is not None:
            ed, es = by_frame.get(info.ed_frame), by_frame.get(info.es_frame)
            if ed is None or es is None:
                notes.append(f"{patient}: Info.cfg names ED frame {info.ed_frame} and ES frame "
                             f"{info.es_frame}, found frames {sorted(by_frame)}")
                continue
            found.append(PhasePair(patient, ed, es, "Info.cfg", info))
            continue
        if len(by_frame) < 2:
            notes.append(f"{patient}: only one phase ({next(iter(by_frame.values()))}); "
                         "indices need ED and ES")
            continue
        ranked = sorted(by_frame.values(), key=lambda c: (-lv_volume_ml(c), c))
        found.append(PhasePair(patient, ranked[0], ranked[-1], "larger LV volume", info,
                               tuple(_half_info_cfg(info, "the larger and the smaller LV "
                                                          "volume"))))
    return sorted(found, key=lambda p: p.patient), notes


def _half_info_cfg(info: PatientInfo | None, instead: str) -> list[str]:
    """The warning of an Info.cfg that gives ED or ES but not both (then both come from
    ``instead``); [] otherwise."""
    if info is None or (info.ed_frame is None) == (info.es_frame is None):
        return []
    given, missing = ("ED", "ES") if info.ed_frame is not None else ("ES", "ED")
    return [f"Info.cfg gives {given} but no {missing}: both taken from {instead} instead"]


def _pair_cines(available: set[str], lv_volume_ml: Callable[[str], float],
                cines: Mapping[str, Sequence[str]],
                info_for: Callable[[str], PatientInfo | None] | None, no_anatomy: set[str],
                ) -> tuple[list[PhasePair], list[str]]:
    """:func:`pair_phases` for the split 4D inputs ``cines``: (pairs, notes)."""
    found: list[PhasePair] = []
    notes: list[str] = []
    for case, frames in sorted(cines.items()):
        patient = case
        if not all(f in available for f in frames):
            notes.append(f"{patient}: not every frame of the 4D series was predicted; "
                         "indices need the whole series")
            continue
        if len(frames) < 2:
            notes.append(f"{patient}: a 4D series of one frame; indices need ED and ES")
            continue
        info = info_for(cine_patient(case)) if info_for is not None else None
        warnings: list[str] = []
        if info is not None and info.n_frames is not None and info.n_frames != len(frames):
            warnings.append(f"Info.cfg says NbFrame {info.n_frames}, the 4D series has "
                            f"{len(frames)} frames: is it this series' Info.cfg?")
        half = _half_info_cfg(info, "the LV volume curve")
        warnings += half
        if not half and info is not None and info.ed_frame is not None \
                and info.es_frame is not None:
            if not (1 <= info.ed_frame <= len(frames) and 1 <= info.es_frame <= len(frames)):
                notes.append(f"{patient}: Info.cfg names ED frame {info.ed_frame} and ES frame "
                             f"{info.es_frame}, the 4D series has frames 1 .. {len(frames)}")
                continue
            found.append(PhasePair(patient, frames[info.ed_frame - 1], frames[info.es_frame - 1],
                                   "Info.cfg", info, tuple(warnings)))
            continue
        # a blank frame, or one without any LV (cut off, failed), is no point of the curve:
        # it would be taken for the smallest LV volume, i.e. ES
        curve = [f for f in frames if f not in no_anatomy and lv_volume_ml(f) > 0.0]
        if len(curve) < 2:
            notes.append(f"{patient}: {len(curve)} of the 4D series' {len(frames)} frames show "
                         "an image with an LV segmented in it; the LV volume curve needs two "
                         "(give ED and ES in an Info.cfg)")
            continue
        if len(curve) < len(frames):
            left_out = [f for f in frames if f not in curve]
            warnings.append(f"{len(left_out)} frame(s) blank or without any LV left out of the "
                            f"LV volume curve ({', '.join(left_out[:3])}"
                            f"{' ...' if len(left_out) > 3 else ''})")
        ranked = sorted(curve, key=lambda c: (-lv_volume_ml(c), c))
        found.append(PhasePair(patient, ranked[0], ranked[-1], "LV volume curve", info,
                               tuple(warnings)))
    return found, notes


PAIRING_TEXT = {
    "Info.cfg": "ED and ES frames from the patient's Info.cfg",
    "pairs CSV": "ED and ES cases from the pairs CSV",
    "larger LV volume": "no ED and ES in an Info.cfg: ED = the frame with the largest LV "
                        "volume, ES = the frame with the smallest",
    "LV volume curve": "a 4D series split with --split-4d, no ED and ES in an Info.cfg: ED = "
                       "its frame with the largest LV volume, ES = its frame with the smallest "
                       "(blank frames and frames without any LV left out)",
    "upload": "as uploaded: 'file' = ED, 'file_es' = ES",
}


def phase_warnings(ed_case: str, es_case: str,
                   input_warnings: Mapping[str, Sequence[str]]) -> list[str]:
    """The input warnings of the two phases (:attr:`Prediction.warnings`: blank, constant,
    another modality ...), each as ``"ED CASE: warning"`` / ``"ES CASE: warning"``: an index
    computed from such a phase must say so where the index is read."""
    return [f"{side} {case}: {w}" for side, case in (("ED", ed_case), ("ES", es_case))
            for w in input_warnings.get(case, ())]


def patient_record(pair: PhasePair, ed: Mapping[str, float], es: Mapping[str, float],
                   roles: LabelRoles,
                   input_warnings: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """One patient's record for ``clinical.json`` / ``clinical.csv``: the pair, how it was
    paired (``pairing`` and ``pairing_rule``), the per-label volumes of both phases (mL) and
    :func:`indices_from_volumes`, whose ``warnings`` come after the pairing's
    (:attr:`PhasePair.warnings`) and the phases' input warnings (``input_warnings``, case ->
    warnings; :func:`phase_warnings`)."""
    indices = indices_from_volumes(ed, es, roles, pair.info)
    indices["warnings"] = [*pair.warnings, *phase_warnings(pair.ed, pair.es, input_warnings or {}),
                           *indices["warnings"]]
    return {"patient": pair.patient, "ed_case": pair.ed, "es_case": pair.es,
            "pairing": pair.pairing, "pairing_rule": PAIRING_TEXT.get(pair.pairing, pair.pairing),
            "volumes_ed_ml": dict(ed), "volumes_es_ml": dict(es), **indices}


CSV_FIELDS: tuple[str, ...] = ("patient", "ed_case", "es_case", "pairing", "group", "height_cm",
                               "weight_kg", "bsa_m2", *INDEX_FIELDS, *INDEXED_FIELDS, "notes")


def write_clinical(records: Sequence[Mapping[str, Any]], output_dir: str | Path,
                   extra: Mapping[str, Any] | None = None, stem: str = "clinical"
                   ) -> tuple[Path, Path]:
    """Write ``clinical.json`` (``{"patients": records, "units", "sources", **extra}``, strict
    JSON: no NaN) and ``clinical.csv`` (one row per patient, :data:`CSV_FIELDS`; undefined
    values empty, their reasons and any warnings in ``notes``) atomically; return both paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = output_dir / f"{stem}.json", output_dir / f"{stem}.csv"
    body = {
        "units": {"*_ml": "mL", "*_EF_pct": "%", "MYO_mass_g": "g (ED myocardium x 1.05 g/mL)",
                  "*i_ml_m2": "mL/m^2", "MYO_massi_g_m2": "g/m^2", "bsa_m2": "m^2"},
        "sources": {"mass": "myocardial density 1.05 g/mL (Bernard et al., IEEE TMI 2018)",
                    "bsa": BSA_FORMULA},
        **(extra or {}),
        "patients": list(records),
    }
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(json_safe(body), indent=2, allow_nan=False))
    with atomic_path(csv_path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_FIELDS)
        for r in records:
            notes = [f"{k}: {v}" for k, v in r.get("undefined", {}).items()
                     if not k.endswith(("i_ml_m2", "i_g_m2"))] + list(r.get("warnings", []))
            row = []
            for f in CSV_FIELDS[:-1]:
                v = r.get(f)
                row.append("" if v is None or (isinstance(v, float) and not math.isfinite(v))
                           else (round(v, 4) if isinstance(v, float) else _csv_text(v)))
            writer.writerow([*row, _csv_text("; ".join(notes))])
    return json_path, csv_path


def _csv_text(value: Any) -> Any:
    """A text cell as a spreadsheet shows it, never runs it: text starting with ``=``, ``+``,
    ``-``, ``@``, a tab or a carriage return (a case named ``=HYPERLINK(...)_4d``) gets a
    leading ``'`` (OWASP's advice on CSV injection); numbers and other text unchanged."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def find_info_cfg(patient: str, folders: Iterable[Path], beside: Iterable[Path] = ()
                  ) -> PatientInfo | None:
    """The Info.cfg of an ACDC patient: ``folder/Info.cfg`` of the first of ``beside`` (folders
    that hold this patient's images and no other's, whatever their names) that has one, else
    in the first of ``folders`` that has one, ``folder/Info.cfg`` when the folder is the
    patient's own (named after it), else ``folder/patient/Info.cfg``.

    Raises:
        DataError: a file found breaks a rule of :func:`read_info_cfg`.
    """
    candidates = [Path(folder) / "Info.cfg" for folder in beside]
    for folder in folders:
        if Path(folder).name == patient:
            candidates.append(Path(folder) / "Info.cfg")
        candidates.append(Path(folder) / patient / "Info.cfg")
    for candidate in candidates:
        if candidate.is_file():
            return read_info_cfg(candidate)
    return None


def info_cfg_lookup(inputs: Mapping[str, Path], input_path: Path,
                    cines: Mapping[str, Sequence[str]] | None = None
                    ) -> Callable[[str], PatientInfo | None]:
    """Patient id -> its Info.cfg (:func:`find_info_cfg`) for a folder of inputs: looked for in
    the folders of the patient's images (as given and with symbolic links resolved), where
    ``folder/Info.cfg`` counts when the folder is named after the patient or holds no other
    patient's images, then in ``input_path/PATIENT/``.

    Args:
        inputs: case -> its (first) input image; a split 4D input's frames are cases of
            their own, listed in ``cines``.
        cines: input case -> its frames' cases: those are ``cine_patient(CASE)``'s images.
            An ACDC case ``patientXXX_frameNN`` is ``patientXXX``'s; any other case its own.

    Returns:
        The lookup; it raises DataError for a bad Info.cfg (:func:`read_info_cfg`).
    """
    cine_of = {f: case for case, frames in (cines or {}).items() for f in frames}

    def patient_of(case: str) -> str:
        return cine_patient(cine_of[case]) if case in cine_of else acdc_patient(case) or case

    parents = {case: list(dict.fromkeys((Path(src).parent, Path(src).resolve().parent)))
               for case, src in inputs.items()}  # resolved once per image
    patients_in: dict[Path, set[str]] = {}
    for case, folders in parents.items():
        for folder in folders:
            patients_in.setdefault(folder, set()).add(patient_of(case))

    def lookup(patient: str) -> PatientInfo | None:
        own = [d for case, ds in parents.items() if case.startswith(patient + "_") for d in ds]
        alone = [d for case, ds in parents.items() if patient_of(case) == patient
                 for d in ds if patients_in[d] == {patient}]
        return find_info_cfg(patient, [*dict.fromkeys(own), Path(input_path)],
                             list(dict.fromkeys(alone)))

    return lookup


def records_from_volumes(volumes: Mapping[str, Mapping[str, float]], labels: Mapping[int, str],
                         pairs: Sequence[PhasePair] | None = None,
                         info_for: Callable[[str], PatientInfo | None] | None = None,
                         cines: Mapping[str, Sequence[str]] | None = None,
                         input_warnings: Mapping[str, Sequence[str]] | None = None,
                         no_anatomy: Iterable[str] = (),
                         ) -> tuple[list[dict[str, Any]], list[str]]:
    """Pair the cases of ``volumes`` (case -> label name -> mL) and compute each patient's
    record (:func:`patient_record`; ``input_warnings``, case -> the warnings of its input,
    go into the records of the phases they concern).

    Args:
        labels: value -> name (roles by :func:`label_roles`).
        pairs: rows of a pairs CSV, else ACDC names (:func:`pair_phases`).
        info_for: patient id -> its Info.cfg or None (e.g. :func:`info_cfg_lookup`).
        no_anatomy: cases whose input is blank or constant, left out of LV volume curves
            (:func:`pair_phases`).
        cines: split 4D inputs, input case -> its frames' cases (:func:`pair_phases`).

    Returns:
        (records sorted by patient, notes on what could not be paired).

    Raises:
        DataError: no LV label; a bad Info.cfg.
    """
    roles = label_roles(labels)
    found, notes = pair_phases(volumes, lambda c: float(volumes[c].get(roles.lv, 0.0)), pairs,
                               info_for, cines, no_anatomy)
    return [patient_record(p, volumes[p.ed], volumes[p.es], roles, input_warnings)
            for p in found], notes
