"""Clinical indices of the expert labels of ACDC patients: LV / RV EDV, ESV, EF and
myocardial mass per patient, as a Markdown table.

    python benchmarks/bench_clinical.py --data ../shared/data/ACDC [--output runs/clinical_gt]

ED / ES come from each patient's Info.cfg when present, else the frame with the larger LV
volume is ED (the ``pairing`` column says which). With ``--output`` the records are also
written as clinical.json / clinical.csv (:func:`uumamba.clinical.write_clinical`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from uumamba.clinical import (
    find_info_cfg,
    label_roles,
    pair_phases,
    patient_record,
    phase_volumes,
    write_clinical,
)
from uumamba.data.io import read_image
from uumamba.data.layouts import ACDC_LABELS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="ACDC folder (patientXXX/)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    labels = dict(ACDC_LABELS)
    roles = label_roles(labels)
    volumes: dict[str, dict[str, float]] = {}
    for gt in sorted(args.data.glob("patient*/patient*_frame*_gt.nii*")):
        mask, geometry = read_image(gt)
        volumes[gt.name.split("_gt")[0]] = phase_volumes(mask, geometry.spacing, labels)
    if not volumes:
        from uumamba.errors import UserError

        raise UserError(f"--data {args.data}: no patientXXX/patientXXX_frameNN_gt.nii.gz there "
                        "(README, 'The ACDC data', says where to obtain them)")
    pairs, notes = pair_phases(volumes, lambda c: volumes[c][roles.lv],
                               info_for=lambda p: find_info_cfg(p, [args.data]))
    records = [patient_record(p, volumes[p.ed], volumes[p.es], roles) for p in pairs]
    print("| patient | ED | ES | pairing | LV EDV (mL) | LV ESV (mL) | LV EF (%) | RV EDV (mL) "
          "| RV ESV (mL) | RV EF (%) | MYO mass (g) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1f}"

    for r in records:
        print(f"| {r['patient']} | {r['ed_case'].split('_')[-1]} | {r['es_case'].split('_')[-1]} "
              f"| {r['pairing']} | {f(r['LV_EDV_ml'])} | {f(r['LV_ESV_ml'])} | {f(r['LV_EF_pct'])} "
              f"| {f(r['RV_EDV_ml'])} | {f(r['RV_ESV_ml'])} | {f(r['RV_EF_pct'])} "
              f"| {f(r['MYO_mass_g'])} |")
    for note in notes:
        print(f"note: {note}")
    if args.output is not None:
        for path in write_clinical(records, args.output, {"source": str(args.data)}):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from uumamba.commands.script import run_script

    sys.exit(run_script(main))
