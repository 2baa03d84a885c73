"""Per-patient clinical report: ``PATIENT_report.html`` (self-contained, PNG embedded) and the
same figure as ``PATIENT_report.png``; and :func:`write_batch_clinical`, the clinical outputs
of one ``uumamba predict`` folder (``clinical.json`` / ``clinical.csv`` and the reports).

The report shows the ED and ES mid-ventricular slices with the mask overlaid (RV blue,
myocardium green, LV red), the indices of :mod:`uumamba.clinical` next to sex-specific adult
reference ranges (:data:`REFERENCE_RANGES`), the pairing rule, every undefined value with its
reason, and the model's name, version and the SHA-256 of every checkpoint
(:class:`uumamba.model_folder.ModelFolder`).

Mid slice: the slice axis is the one the model sliced along
(:func:`uumamba.data.orientation.slice_axis`, from the mask's spacing and shape); the slice shown is the middle one of the slices holding LV at that
phase (the middle of the volume when the LV is empty).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uumamba.clinical import (
    INDEX_FIELDS,
    INDEXED_FIELDS,
    LabelRoles,
    PhasePair,
    info_cfg_lookup,
    label_roles,
    records_from_volumes,
    write_clinical,
)
from uumamba.data.orientation import slice_axis
from uumamba.errors import DataError, UserError
from uumamba.utils import atomic_path

#: The published sources of :data:`REFERENCE_RANGES` (each range names one).
REFERENCE_SOURCES: dict[str, str] = {
    "hudsmith2005": (
        "Hudsmith LE, Petersen SE, Francis JM, Robson MD, Neubauer S. Normal human left and "
        "right ventricular and left atrial dimensions using steady state free precession "
        "magnetic resonance imaging. J Cardiovasc Magn Reson 2005;7(5):775-782 (108 healthy "
        "volunteers, 63 men / 45 women, bSSFP at 1.5 T; mean ± SD from its abstract)"),
    "chuang2014": (
        "Chuang ML, Gona P, Hautvast GLTF, et al. CMR reference values for left ventricular "
        "volumes, mass and ejection fraction using computer-aided analysis: the Framingham "
        "Heart Study. J Magn Reson Imaging 2014;39(4):895-900 (685 healthy adults, short-axis "
        "cine SSFP; mean ± SD from its abstract)"),
}
#: index -> (source key, {"men": (mean, lower, upper), "women": (...)}); lower / upper =
#: mean ∓ 1.96 SD of the source's healthy volunteers, rounded to whole units. Indices without
#: a source checked here (myocardial mass, RV EF, BSA-indexed values) have no range shown.
REFERENCE_RANGES: dict[str, tuple[str, dict[str, tuple[float, float, float]]]] = {
    "LV_EDV_ml": ("hudsmith2005", {"men": (160, 103, 217), "women": (135, 84, 186)}),
    "LV_ESV_ml": ("hudsmith2005", {"men": (50, 19, 81), "women": (42, 18, 66)}),
    "RV_EDV_ml": ("hudsmith2005", {"men": (190, 125, 255), "women": (148, 79, 217)}),
    "RV_ESV_ml": ("hudsmith2005", {"men": (78, 39, 117), "women": (56, 21, 91)}),
    "LV_EF_pct": ("chuang2014", {"men": (71, 59, 83), "women": (73, 61, 85)}),
}

_NAMES = {
    "LV_EDV_ml": ("LV end-diastolic volume", "mL"), "LV_ESV_ml": ("LV end-systolic volume", "mL"),
    "LV_SV_ml": ("LV stroke volume", "mL"), "LV_EF_pct": ("LV ejection fraction", "%"),
    "RV_EDV_ml": ("RV end-diastolic volume", "mL"), "RV_ESV_ml": ("RV end-systolic volume", "mL"),
    "RV_SV_ml": ("RV stroke volume", "mL"), "RV_EF_pct": ("RV ejection fraction", "%"),
    "MYO_mass_g": ("LV myocardial mass (ED)", "g"),
    "LV_EDVi_ml_m2": ("LV EDV / BSA", "mL/m²"), "LV_ESVi_ml_m2": ("LV ESV / BSA", "mL/m²"),
    "LV_SVi_ml_m2": ("LV SV / BSA", "mL/m²"), "RV_EDVi_ml_m2": ("RV EDV / BSA", "mL/m²"),
    "RV_ESVi_ml_m2": ("RV ESV / BSA", "mL/m²"), "RV_SVi_ml_m2": ("RV SV / BSA", "mL/m²"),
    "MYO_massi_g_m2": ("LV mass / BSA", "g/m²"),
}
_COLOURS = {"RV": (0.12, 0.47, 0.95), "MYO": (0.10, 0.75, 0.25), "LV": (0.95, 0.20, 0.15)}


def mid_slice(mask: np.ndarray, spacing: Sequence[float], lv_value: int) -> tuple[int, int]:
    """(slice axis, index) of the mid-ventricular slice of an (x, y, z) mask: the slice axis
    (:func:`uumamba.data.orientation.slice_axis`), the middle of the slices holding
    ``lv_value`` (else of the volume)."""
    axis = slice_axis([float(s) for s in spacing[:3]], np.shape(mask)[:3])
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(np.any(np.asarray(mask) == lv_value, axis=other))
    if present.size == 0:
        return axis, mask.shape[axis] // 2
    return axis, int(present[len(present) // 2])


def _overlay(ax: Any, image: np.ndarray, mask: np.ndarray, spacing: Sequence[float],
             values: Mapping[str, int], lv_value: int, title: str) -> None:
    axis, k = mid_slice(mask, spacing, lv_value)
    img = np.take(np.asarray(image, dtype=np.float32), k, axis=axis)
    lab = np.take(np.asarray(mask), k, axis=axis)
    in_plane = [float(s) for i, s in enumerate(spacing[:3]) if i != axis]
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
    grey = np.clip((img - lo) / ((hi - lo) or 1.0), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for role, value in values.items():
        sel = lab == value
        rgb[sel] = 0.55 * rgb[sel] + 0.45 * np.array(_COLOURS[role])
    # rows = second in-plane axis, so the physical aspect is in_plane[1] / in_plane[0]
    ax.imshow(np.transpose(rgb, (1, 0, 2)), origin="lower", interpolation="nearest",
              aspect=in_plane[1] / in_plane[0])
    ax.set_title(f"{title}: slice {k + 1} of {mask.shape[axis]}")
    ax.axis("off")


def render_figure(ed_image: np.ndarray, ed_mask: np.ndarray, ed_spacing: Sequence[float],
                  es_image: np.ndarray, es_mask: np.ndarray, es_spacing: Sequence[float],
                  roles: LabelRoles, labels: Mapping[int, str], title: str) -> bytes:
    """PNG bytes: the ED and ES mid slices side by side with the mask overlaid and a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    by_name = {n: v for v, n in labels.items()}
    values = {role: by_name[name] for role, name in
              (("RV", roles.rv), ("MYO", roles.myo), ("LV", roles.lv)) if name is not None}
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4))
    _overlay(axes[0], ed_image, ed_mask, ed_spacing, values, values["LV"], "ED")
    _overlay(axes[1], es_image, es_mask, es_spacing, values, values["LV"], "ES")
    fig.legend(handles=[Patch(color=_COLOURS[r], label=r) for r in values], loc="lower center",
               ncol=len(values), frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _fmt(v: Any, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _range_cells(index: str, value: float | None) -> tuple[str, str, str]:
    if index not in REFERENCE_RANGES:
        return "", "", ""
    _source, ranges = REFERENCE_RANGES[index]
    cells = []
    for sex in ("men", "women"):
        mean, low, high = ranges[sex]
        cells.append(f"{mean:g} ({low:g}–{high:g})")
    if value is None:
        flag = ""
    else:
        outside = [sex for sex in ("men", "women")
                   if not ranges[sex][1] <= value <= ranges[sex][2]]
        flag = ("outside both" if len(outside) == 2 else
                f"outside ({outside[0]})" if outside else "within both")
    return cells[0], cells[1], flag


def report_html(record: Mapping[str, Any], figure_png: bytes,
                model: Mapping[str, Any] | None = None) -> str:
    """The report as one HTML document (figure embedded as base64 PNG); every value from
    ``record`` (:func:`uumamba.clinical.patient_record`) is HTML-escaped."""
    e = html.escape
    rows = []
    for index in (*INDEX_FIELDS, *INDEXED_FIELDS):
        name, unit = _NAMES[index]
        value = record.get(index)
        why = record.get("undefined", {}).get(index, "")
        men, women, flag = _range_cells(index, value)
        rows.append(f"<tr><td>{e(name)}</td><td class=n>{e(_fmt(value))}</td><td>{e(unit)}</td>"
                    f"<td>{e(men)}</td><td>{e(women)}</td><td>{e(flag)}</td>"
                    f"<td class=why>{e(why)}</td></tr>")
    body_info = [("patient", record.get("patient")), ("ED case", record.get("ed_case")),
                 ("ES case", record.get("es_case")),
                 ("pairing", record.get("pairing_rule") or record.get("pairing")),
                 ("group (Info.cfg)", record.get("group")),
                 ("height / weight", None if record.get("height_cm") is None else
                  f"{record['height_cm']:g} cm / {record['weight_kg']:g} kg"),
                 ("BSA", None if record.get("bsa_m2") is None else
                  f"{record['bsa_m2']:.2f} m² ({record.get('bsa_formula')})")]
    info_rows = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v) if v is not None else '—')}</td></tr>"
                        for k, v in body_info)
    model_rows = ""
    if model:
        weights = "<br>".join(f"{e(w['file'])}: sha256 {e(w['sha256'])}"
                              for w in model.get("weights", []))
        model_rows = "".join(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in (
            ("model", e(str(model.get("name")))), ("version", e(str(model.get("version")))),
            ("folds", e(", ".join(model.get("folds", [])))), ("checkpoints", weights),
            ("uumamba", e(str(model.get("package_version"))))))
    warnings = "".join(f"<li>{e(w)}</li>" for w in record.get("warnings", []))
    sources = "".join(
        f"<li>{e(', '.join(_NAMES[i][0] for i, (k, _r) in REFERENCE_RANGES.items() if k == key))}"
        f": {e(text)}</li>" for key, text in REFERENCE_SOURCES.items())
    img = base64.b64encode(figure_png).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Clinical indices — {e(str(record.get('patient')))}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;
text-align:left;font-size:14px}}td.n{{text-align:right}}td.why{{color:#666;font-size:12px}}
.warn{{color:#a40}}img{{max-width:100%}}</style></head><body>
<h1>Clinical indices: {e(str(record.get('patient')))}</h1>
<p>Research software output from an automatic segmentation; not a diagnosis.</p>
<table>{info_rows}{model_rows}</table>
<img alt="ED and ES mid-ventricular slices with the segmentation overlaid"
 src="data:image/png;base64,{img}">
<h2>Indices</h2>
<table><tr><th>index</th><th>value</th><th>unit</th><th>normal range, men</th>
<th>normal range, women</th><th>vs range</th><th>undefined because</th></tr>
{''.join(rows)}</table>
{'<h2>Warnings</h2><ul>' + warnings + '</ul>' if warnings else ''}
<h2>Methods and sources</h2>
<ul><li>Volumes: voxel count × voxel volume (product of the spacing in mm / 1000), slice
summation of the mask; SV = EDV − ESV; EF = 100 × SV / EDV.</li>
<li>Myocardial mass: myocardium volume at ED × 1.05 g/mL (Bernard et al., IEEE TMI
2018;37(11):2514–2525).</li>
<li>BSA: Mosteller, sqrt(height cm × weight kg / 3600) (N Engl J Med 1987;317(17):1098).</li>
<li>Normal ranges (adults; mean, and mean ± 1.96 SD of healthy volunteers): sex is not
recorded in the input, so both are shown; other indices have no range here.<ul>{sources}</ul>
</li></ul>
<p>Generated {e(_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))}.</p>
</body></html>
"""


def write_report(record: Mapping[str, Any], ed: tuple[np.ndarray, np.ndarray, Sequence[float]],
                 es: tuple[np.ndarray, np.ndarray, Sequence[float]], labels: Mapping[int, str],
                 output_dir: str | Path, model: Mapping[str, Any] | None = None
                 ) -> tuple[Path, Path]:
    """Write ``<patient>_report.html`` and ``<patient>_report.png`` atomically.

    Args:
        record: the patient's :func:`uumamba.clinical.patient_record`.
        ed, es: (image, mask, spacing mm) of each phase, arrays (x, y, z) of one grid.
        labels: value -> name (roles by :func:`uumamba.clinical.label_roles`).
        model: ``name``, ``version``, ``folds``, ``weights`` (``file``, ``sha256``),
            ``package_version`` (e.g. the service's ``ModelInfo``), optional.

    Returns:
        (html path, png path).
    """
    roles = label_roles(labels)
    png = render_figure(*ed, *es, roles, labels,
                        f"{record.get('patient')}: ED {record.get('ed_case')}, "
                        f"ES {record.get('es_case')}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    html_path = output_dir / f"{record.get('patient')}_report.html"
    png_path = output_dir / f"{record.get('patient')}_report.png"
    with atomic_path(png_path) as tmp:
        tmp.write_bytes(png)
    with atomic_path(html_path) as tmp:
        tmp.write_text(report_html(record, png, model), encoding="utf-8")
    return html_path, png_path


@dataclass
class BatchClinical:
    """What :func:`write_batch_clinical` produced: the patients' records, the files written
    and one-line notes (unpaired cases, a label set without LV)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def model_description(model_dir: str | Path, weights: Sequence[Any]) -> dict[str, Any]:
    """Name, version (:meth:`ModelFolder.version`), folds, the SHA-256 of every checkpoint
    and the uumamba version of a model folder, for ``clinical.json`` and the report.

    ``weights``: the :class:`~uumamba.model_folder.WeightsDigest` of each fold as loaded
    (``Predictor.weights``): the checkpoint chosen (``--checkpoint``), hashed from the bytes
    that were loaded."""
    import uumamba
    from uumamba.model_folder import ModelFolder

    return {"name": ModelFolder(model_dir).name, "version": ModelFolder.version(weights),
            "folds": [d.fold for d in weights], "package_version": uumamba.__version__,
            "weights": [{"file": d.file, "sha256": d.sha256} for d in weights]}


def write_batch_clinical(volumes: Mapping[str, Mapping[str, float]], inputs: Mapping[str, Path],
                         labels: Mapping[int, str], model_dir: str | Path,
                         weights: Sequence[Any], input_path: Path, output_dir: Path,
                         pairs: Sequence[PhasePair] | None = None, report: bool = False,
                         out_format: str | None = None, required: bool = False,
                         cines: Mapping[str, Sequence[str]] | None = None,
                         input_warnings: Mapping[str, Sequence[str]] | None = None,
                         ) -> BatchClinical:
    """The clinical outputs of a folder of predictions: ``clinical.json`` / ``clinical.csv``
    when at least one patient has both phases, and with ``report`` one report per patient.

    Args:
        volumes: output case -> label name -> mL (``BatchResult.volumes_ml``).
        inputs: output case -> its input image (``BatchResult.inputs``); Info.cfg is looked
            for beside it (symlinks followed) and in ``input_path/PATIENT/``.
        labels: the model's value -> name.
        model_dir, weights: the model folder and its folds' digests as loaded
            (``Predictor.weights``): name, version and checksums go into the outputs.
        output_dir: where the masks were written (``CASE<suffix>``, read back for reports).
        pairs: rows of a pairs CSV (else ACDC names, :func:`uumamba.clinical.pair_phases`).
        out_format: the masks' ``--format`` (``None``: the input's); ``seg.nrrd`` cannot be
            read back for a report.
        required: ``--pairs`` / ``--report`` asked for it: a label set without LV or no
            patient with both phases raises instead of giving a note.
        cines: the 4D inputs split into frames (``--split-4d``): input case -> its frames'
            cases in time order; each series is one record, ED and ES from its Info.cfg or
            its LV volume curve (:func:`uumamba.clinical.pair_phases`); a report shows the
            frame of the 4D input.
        input_warnings: output case -> its input's warnings (``BatchResult.warnings``), put
            into the records of the phases they concern.

    Raises:
        DataError / UserError: ``required`` and nothing to compute; a bad Info.cfg; a
            report with ``seg.nrrd`` masks.
    """
    out = BatchClinical()
    try:
        label_roles(labels)
    except DataError as exc:
        if required:
            raise
        out.notes.append(f"no clinical indices: {exc}")
        return out

    from uumamba.inference.plausibility import BLANK_WARNING

    blank = [case for case, found in (input_warnings or {}).items()
             if any(w.startswith(BLANK_WARNING) for w in found)]
    out.records, out.notes = records_from_volumes(
        volumes, labels, pairs, info_cfg_lookup(inputs, input_path, cines), cines,
        input_warnings, blank)
    if not out.records:
        if required:
            raise UserError("no patient has both an ED and an ES prediction: no clinical "
                            "indices" + (f" ({out.notes[0]})" if out.notes else ""))
        return out
    model = model_description(model_dir, weights)
    out.written += write_clinical(out.records, output_dir, {"model": model})
    if report:
        from uumamba.data.io import read_image
        from uumamba.inference.writer import mask_suffix

        # a split 4D input's frame: (its position in the series) -> that time point's image
        frame_of = {f: t for frames in (cines or {}).values() for t, f in enumerate(frames)}
        for record in out.records:
            phases = []
            for case in (record["ed_case"], record["es_case"]):
                suffix, fmt = mask_suffix(Path(inputs[case]), out_format)
                if fmt is None:
                    raise UserError("--report reads the masks back: use a --format other "
                                    "than seg.nrrd")
                image, geometry = read_image(inputs[case])
                if case in frame_of and image.ndim == 4:
                    image = image[..., frame_of[case]]
                mask, _ = read_image(Path(output_dir) / f"{case}{suffix}")
                phases.append((image, mask, geometry.spacing))
            out.written += write_report(record, phases[0], phases[1], labels, output_dir, model)
    return out
