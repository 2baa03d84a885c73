"""Agreement of clinical indices from predicted masks with those from the reference masks, as
the ACDC challenge scored them (Bernard et al., IEEE TMI 37(11):2514-2525, 2018, Sec. IV-B):
per index the Pearson correlation, the mean bias and 95 % limits of agreement (Bland & Altman,
"Statistical methods for assessing agreement between two methods of clinical measurement",
Lancet 1986;1(8476):307-310), and the mean absolute error.

For an index with predicted values p_i and reference values r_i over the n patients where both
are defined, d_i = p_i - r_i:

- ``bias`` = mean(d); ``sd_diff`` = SD of d (n - 1 in the denominator);
- ``loa_low`` / ``loa_high`` = bias -/+ 1.96 sd_diff (95 % limits of agreement);
- ``mae`` = mean |d|; ``pearson_r`` = Pearson correlation of p and r (``None`` with a reason
  when n < 3 or either side has no variance).

:func:`evaluate_clinical` reads two folders of masks (predictions, references), pairs ED with
ES by the references (:func:`uumamba.clinical.pair_phases`, so both sides use the same
frames), computes each patient's indices on both sides and their agreement;
:func:`plot_agreement` draws the Bland-Altman plots (``clinical_bland_altman.png``) and the
scatter plots with the identity line (``clinical_scatter.png``), one panel per index.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uumamba.clinical import (
    PhasePair,
    find_info_cfg,
    label_roles,
    pair_phases,
    patient_record,
    phase_volumes,
    read_pairs_csv,
)
from uumamba.errors import UserError
from uumamba.utils import atomic_path

#: Indices compared by ``evaluate --clinical`` (those the ACDC challenge scored, with ESVs).
AGREEMENT_INDICES: tuple[str, ...] = (
    "LV_EDV_ml", "LV_ESV_ml", "LV_EF_pct", "RV_EDV_ml", "RV_ESV_ml", "RV_EF_pct", "MYO_mass_g",
)
_UNITS = {"ml": "mL", "pct": "%", "g": "g"}


def agreement(predicted: Sequence[float | None], reference: Sequence[float | None]
              ) -> dict[str, Any]:
    """Agreement statistics of paired measurements (module docstring); pairs where either
    value is ``None`` / NaN are left out (counted in ``n_undefined``).

    Returns:
        ``{"n", "n_undefined", "pearson_r", "bias", "sd_diff", "loa_low", "loa_high", "mae",
        "reasons"}``; a statistic that cannot be computed is ``None`` with its reason in
        ``reasons``.
    """
    pairs = [(float(p), float(r)) for p, r in zip(predicted, reference, strict=True)
             if p is not None and r is not None and math.isfinite(p) and math.isfinite(r)]
    out: dict[str, Any] = {"n": len(pairs), "n_undefined": len(predicted) - len(pairs),
                           "pearson_r": None, "bias": None, "sd_diff": None, "loa_low": None,
                           "loa_high": None, "mae": None, "reasons": {}}
    if not pairs:
        out["reasons"]["all"] = "no patient with the index defined on both sides"
        return out
    p, r = np.array(pairs).T
    d = p - r
    out["bias"] = float(d.mean())
    out["mae"] = float(np.abs(d).mean())
    if len(d) >= 2:
        sd = float(d.std(ddof=1))
        out.update(sd_diff=sd, loa_low=out["bias"] - 1.96 * sd, loa_high=out["bias"] + 1.96 * sd)
    else:
        out["reasons"]["loa"] = "limits of agreement need at least 2 patients"
    if len(d) < 3:
        out["reasons"]["pearson_r"] = "correlation needs at least 3 patients"
    elif p.std() == 0 or r.std() == 0:
        out["reasons"]["pearson_r"] = "one side has no variance"
    else:
        out["pearson_r"] = float(np.corrcoef(p, r)[0, 1])
    return out


def _volumes(files: Mapping[str, Path], labels: Mapping[int, str]) -> dict[str, dict[str, float]]:
    from uumamba.evaluation.evaluate import _read_labels

    out = {}
    for case, path in files.items():
        mask, geometry = _read_labels(Path(path), labels)
        out[case] = phase_volumes(mask, geometry.spacing, labels)
    return out


def evaluate_clinical(pred_files: Mapping[str, Path], ref_files: Mapping[str, Path],
                      labels: Mapping[int, str], pairs_csv: str | Path | None = None,
                      info_folders: Sequence[Path] = ()) -> dict[str, Any]:
    """Clinical indices of predictions and references, per patient, and their agreement.

    Args:
        pred_files / ref_files: case id -> label map (cases in both are used).
        labels: value -> name (roles by :func:`uumamba.clinical.label_roles`).
        pairs_csv: pairs CSV (case_ED, case_ES, patient); else ACDC names and Info.cfg.
        info_folders: where to look for ``patientXXX/Info.cfg`` (the reference folder).

    Returns:
        ``{"patients": [{"patient", "ed_case", "es_case", "pairing", "predicted": record,
        "reference": record}], "agreement": {index: agreement()}, "notes": [...],
        "n_patients"}``.

    Raises:
        UserError / DataError: no LV label, an unreadable mask or pairs CSV, or no patient
            with both phases.
    """
    roles = label_roles(labels)
    common = sorted(set(pred_files) & set(ref_files))
    pairs: list[PhasePair] | None = read_pairs_csv(pairs_csv) if pairs_csv else None
    ref_vol = _volumes({c: ref_files[c] for c in common}, labels)
    found, notes = pair_phases(common, lambda c: ref_vol[c][roles.lv], pairs,
                               info_for=lambda p: find_info_cfg(p, info_folders))
    if not found:
        raise UserError("--clinical: no patient has both an ED and an ES case among the "
                        f"{len(common)} scored case(s)" + (f" ({notes[0]})" if notes else ""))
    pred_vol = _volumes({c: pred_files[c] for p in found for c in (p.ed, p.es)}, labels)
    patients = []
    for pair in found:
        patients.append({
            "patient": pair.patient, "ed_case": pair.ed, "es_case": pair.es,
            "pairing": pair.pairing,
            "predicted": patient_record(pair, pred_vol[pair.ed], pred_vol[pair.es], roles),
            "reference": patient_record(pair, ref_vol[pair.ed], ref_vol[pair.es], roles),
        })
    stats = {index: agreement([p["predicted"][index] for p in patients],
                              [p["reference"][index] for p in patients])
             for index in AGREEMENT_INDICES}
    return {"n_patients": len(patients), "pairing_by": "reference masks", "patients": patients,
            "agreement": stats, "notes": notes}


def _label(index: str) -> str:
    name, unit = index.rsplit("_", 1)
    return f"{name.replace('_', ' ')} ({_UNITS.get(unit, unit)})"


def plot_agreement(result: Mapping[str, Any], output_dir: str | Path) -> tuple[Path, Path]:
    """Write ``clinical_bland_altman.png`` (difference predicted - reference against their
    mean, with the bias and the 95 % limits of agreement) and ``clinical_scatter.png``
    (predicted against reference with the identity line and r), one panel per index of
    :data:`AGREEMENT_INDICES`, atomically; return both paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind in ("bland_altman", "scatter"):
        fig, axes = plt.subplots(2, 4, figsize=(16, 8))
        for ax, index in zip(axes.flat, AGREEMENT_INDICES, strict=False):
            pts = [(p["predicted"][index], p["reference"][index]) for p in result["patients"]
                   if p["predicted"][index] is not None and p["reference"][index] is not None]
            stats = result["agreement"][index]
            ax.set_title(_label(index))
            if not pts:
                ax.text(0.5, 0.5, "no patient with both values", ha="center", transform=ax.transAxes)
                continue
            pred, ref = np.array(pts).T
            if kind == "bland_altman":
                ax.scatter((pred + ref) / 2, pred - ref, s=18, color="tab:blue")
                ax.axhline(stats["bias"], color="black", label=f"bias {stats['bias']:.1f}")
                if stats["loa_low"] is not None:
                    for v in (stats["loa_low"], stats["loa_high"]):
                        ax.axhline(v, color="tab:red", linestyle="--")
                    ax.plot([], [], color="tab:red", linestyle="--",
                            label=f"95% LoA [{stats['loa_low']:.1f}, {stats['loa_high']:.1f}]")
                ax.set_xlabel("mean of predicted and reference")
                ax.set_ylabel("predicted - reference")
            else:
                low, high = float(min(pred.min(), ref.min())), float(max(pred.max(), ref.max()))
                pad = 0.05 * (high - low or 1.0)
                ax.plot([low - pad, high + pad], [low - pad, high + pad], color="gray",
                        linestyle=":", label="identity")
                r = stats["pearson_r"]
                ax.scatter(ref, pred, s=18, color="tab:blue",
                           label=f"n={stats['n']}, r={'n/a' if r is None else f'{r:.3f}'}")
                ax.set_xlabel("reference")
                ax.set_ylabel("predicted")
                ax.set_aspect("equal", adjustable="datalim")
            ax.legend(fontsize=8, loc="best")
        axes.flat[-1].axis("off")
        title = ("Bland-Altman: predicted - reference" if kind == "bland_altman"
                 else "Predicted vs reference (dotted: identity)")
        fig.suptitle(f"{title} ({result['n_patients']} patients)")
        fig.tight_layout()
        path = output_dir / f"clinical_{kind}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths[0], paths[1]


def write_clinical_evaluation(result: Mapping[str, Any], output_dir: str | Path
                              ) -> list[Path]:
    """Write ``clinical_summary.json`` (the whole :func:`evaluate_clinical` result, strict
    JSON), ``clinical_metrics.csv`` (one row per patient and index: predicted, reference,
    difference; undefined values empty), ``clinical_agreement.csv`` (one row per index: n,
    r, bias, SD, limits of agreement, MAE) and the two figures of :func:`plot_agreement`,
    atomically; return the paths."""
    import csv
    import json

    from uumamba.utils import json_safe

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = output_dir / "clinical_summary.json", output_dir / "clinical_metrics.csv"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(json_safe(dict(result)), indent=2, allow_nan=False))
    with atomic_path(csv_path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["patient", "ed_case", "es_case", "pairing", "index", "predicted",
                         "reference", "difference"])
        for p in result["patients"]:
            for index in AGREEMENT_INDICES:
                pv, rv = p["predicted"][index], p["reference"][index]
                diff = "" if pv is None or rv is None else round(pv - rv, 4)
                writer.writerow([p["patient"], p["ed_case"], p["es_case"], p["pairing"], index,
                                 "" if pv is None else round(pv, 4),
                                 "" if rv is None else round(rv, 4), diff])
    agree_path = output_dir / "clinical_agreement.csv"
    columns = ("n", "n_undefined", "pearson_r", "bias", "sd_diff", "loa_low", "loa_high", "mae")
    with atomic_path(agree_path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["index", *columns])
        for index, s in result["agreement"].items():
            writer.writerow([index, *("" if s[k] is None else
                                      (round(s[k], 4) if isinstance(s[k], float) else s[k])
                                      for k in columns)])
    return [json_path, csv_path, agree_path, *plot_agreement(result, output_dir)]
