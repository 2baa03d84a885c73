"""Dataset folder layouts: find the cases (image files, label file, patient) in a folder.

Supported layouts, tried in this order by ``discover(root, layout="auto")``:

1. ``nnunet`` — nnU-Net v2 raw: ``dataset.json`` with ``channel_names`` / ``file_ending``,
   ``imagesTr/CASE_0000.ext`` (one file per channel; or a folder ``imagesTr/CASE_0000/``
   holding one DICOM series), ``labelsTr/CASE.ext``, ``imagesTs/``.
2. ``msd`` — Medical Segmentation Decathlon: ``dataset.json`` with a ``training`` list of
   ``{"image", "label"}`` pairs (paths relative to the folder) and an optional ``test`` list.
3. ``acdc`` — ACDC as downloaded: ``patientXXX/patientXXX_frameNN.nii.gz`` with
   ``..._frameNN_gt.nii.gz`` (also under ``training/`` / ``testing/``). ``Info.cfg`` ED / ES
   frame numbers tag the phase when present; the 4D cine ``_4d.nii.gz`` is never a training
   image. The group is the patient, so ED and ES of one patient stay in one fold.
4. ``imagecas`` — ImageCAS: ``N.img.nii.gz`` + ``N.label.nii.gz`` (any sub-folder).
5. ``aortaseg24`` — AortaSeg24: ``subjectNNN_CTA.mha`` + ``subjectNNN_label.mha`` (any
   sub-folder).
6. ``folder`` — ``images/`` + ``labels/`` with matching file stems (``.nii``, ``.nii.gz``,
   ``.nrrd``, ``.mha``); images without a label become test images. A sub-folder
   ``images/NAME/`` holding DICOM files is the image of case ``NAME`` (one series, read by
   :func:`uumamba.data.io.read_dicom_folder`; label ``labels/NAME.nii.gz``); whether it holds
   exactly one valid series is checked when it is read (``check-data``), not here.

Outside ACDC the group of a case is its id (one case per patient). Label maps and modality
come from ``dataset.json`` where there is one, or from what the challenge defines (ACDC,
ImageCAS, AortaSeg24); otherwise they are ``None`` and the config must supply them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from uumamba.data.labels import labels_from_mapping, read_json_object
from uumamba.errors import DataError

#: File endings read as images (longest first so ``.nii.gz`` wins over ``.gz``).
IMAGE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

LAYOUTS: tuple[str, ...] = ("nnunet", "msd", "acdc", "imagecas", "aortaseg24", "folder")

ACDC_LABELS: dict[int, str] = {0: "background", 1: "RV", 2: "MYO", 3: "LV"}
IMAGECAS_LABELS: dict[int, str] = {0: "background", 1: "coronary_artery"}
#: AortaSeg24 (Imran et al., 2025, arXiv:2502.05330): 23 aortic branches and SVS/STS zones.
AORTASEG24_LABELS: dict[int, str] = {
    0: "background",
    1: "zone_0",
    2: "innominate_artery",
    3: "zone_1",
    4: "left_common_carotid_artery",
    5: "zone_2",
    6: "left_subclavian_artery",
    7: "zone_3",
    8: "zone_4",
    9: "zone_5",
    10: "zone_6",
    11: "celiac_artery",
    12: "zone_7",
    13: "superior_mesenteric_artery",
    14: "zone_8",
    15: "right_renal_artery",
    16: "left_renal_artery",
    17: "zone_9",
    18: "zone_10_right_common_iliac",
    19: "zone_10_left_common_iliac",
    20: "right_internal_iliac_artery",
    21: "left_internal_iliac_artery",
    22: "zone_11_right_external_iliac",
    23: "zone_11_left_external_iliac",
}


@dataclass(frozen=True)
class Case:
    """One case: the image file(s) of one volume and its label map.

    Attributes:
        id: case identifier (unique in a dataset; used in splits.json and output names).
        group: patient identifier; cases of one group are never split across folds.
        images: one path per input channel, in channel order.
        label: label-map path, or ``None`` for unlabelled (test) images.
        phase: cardiac phase ``"ED"`` / ``"ES"`` where the layout records it (ACDC Info.cfg).
    """

    id: str
    group: str
    images: list[Path]
    label: Path | None
    phase: str | None = None


@dataclass
class DatasetIndex:
    """The cases found in a dataset folder.

    Attributes:
        root: the dataset folder.
        layout: the layout recognised (one of :data:`LAYOUTS`).
        cases: labelled cases, sorted by id.
        labels: label value -> name from the dataset's own metadata, background included;
            ``None`` when the layout does not define them.
        modality: ``"MRI"`` / ``"CT"`` when the layout says, else ``None``.
        test_images: unlabelled cases (``label`` is ``None``), sorted by id.
        orphans: files of the layout that belong to no case (e.g. a label without an image);
            :func:`uumamba.data.check.check_dataset` reports each as an error.
    """

    root: Path
    layout: str
    cases: list[Case]
    labels: dict[int, str] | None = None
    modality: str | None = None
    test_images: list[Case] = field(default_factory=list)
    orphans: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def num_channels(self) -> int:
        """Input channels per case (from the first case; 1 for an empty index)."""
        first = (self.cases or self.test_images or [None])[0]
        return len(first.images) if first is not None else 1


def split_suffix(path: Path) -> tuple[str, str]:
    """Split a file name into (stem, image suffix); suffix is ``""`` when not an image ending."""
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def _image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (hidden and macOS ``._`` files skipped), sorted."""
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and split_suffix(p)[1]
    )


#: Files looked at per folder when deciding whether a folder holds DICOM (as ``predict`` does).
_DICOM_PROBE_FILES = 50


def holds_dicom(folder: Path) -> bool:
    """True when ``folder`` (searched recursively, symbolic links not followed) holds a DICOM
    Part 10 file among the first 50 files (sorted by name) of one of its folders."""
    import os

    from uumamba.data.dicom_series import is_part10  # uumamba.dicom imports uumamba.data.io

    for parent, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files)[:_DICOM_PROBE_FILES]:
            path = Path(parent) / name
            if not path.is_symlink() and is_part10(path):
                return True
    return False


def _dicom_folders(folder: Path) -> list[Path]:
    """Sub-folders of ``folder`` (hidden ones skipped) that hold DICOM files, sorted."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
                  and holds_dicom(p))


def _modality_from_names(names: list[str]) -> str:
    """nnU-Net convention: channels named ``CT`` get CT normalisation, all others z-score."""
    return "CT" if names and all(n.strip().upper() in ("CT", "CTA") for n in names) else "MRI"


# --------------------------------------------------------------------------------------------
# nnU-Net v2 raw


def _is_nnunet(root: Path) -> bool:
    if not (root / "dataset.json").is_file() or not (root / "imagesTr").is_dir():
        return False
    data = read_json_object(root / "dataset.json")
    return "channel_names" in data or "file_ending" in data


def _discover_nnunet(root: Path) -> DatasetIndex:
    meta_path = root / "dataset.json"
    meta = read_json_object(meta_path)
    channels = meta.get("channel_names") or meta.get("modality") or {"0": "unknown"}
    channel_keys = sorted(int(k) for k in channels)
    ending = meta.get("file_ending", ".nii.gz")
    labels = labels_from_mapping(meta["labels"], meta_path) if meta.get("labels") else None

    def channel_path(folder: Path, case_id: str, c: int) -> Path:
        file = folder / f"{case_id}_{c:04d}{ending}"
        series = folder / f"{case_id}_{c:04d}"
        return series if not file.is_file() and series.is_dir() else file

    def collect(folder: Path, labelled: bool) -> list[Case]:
        pattern = re.compile(r"^(.*)_(\d{4})" + re.escape(ending) + "$")
        ids = {m.group(1) for p in folder.glob(f"*{ending}") if (m := pattern.match(p.name))}
        series_pattern = re.compile(r"^(.*)_(\d{4})$")  # CASE_0000/ holding a DICOM series
        entries = folder.iterdir() if folder.is_dir() else ()
        ids |= {m.group(1) for p in entries if p.is_dir() and not p.is_symlink()
                and (m := series_pattern.match(p.name)) and holds_dicom(p)}
        cases = []
        for case_id in sorted(ids):
            images = [channel_path(folder, case_id, c) for c in channel_keys]
            missing = [p for p in images if not p.exists()]
            if missing:
                raise DataError(f"{missing[0]}: channel file missing for case '{case_id}' "
                                f"({len(channel_keys)} channels declared in {meta_path})")
            label = root / "labelsTr" / f"{case_id}{ending}" if labelled else None
            if labelled and not label.is_file():
                raise DataError(f"{label}: label missing for case '{case_id}'")
            cases.append(Case(case_id, case_id, images, label))
        return cases

    cases = collect(root / "imagesTr", labelled=True)
    expected = meta.get("numTraining")
    if expected is not None and int(expected) != len(cases):
        raise DataError(f"{meta_path}: numTraining is {expected} but {root / 'imagesTr'} "
                        f"holds {len(cases)} cases with ending '{ending}'")
    tests = collect(root / "imagesTs", labelled=False) if (root / "imagesTs").is_dir() else []
    names = [str(v) for _, v in sorted(channels.items(), key=lambda kv: int(kv[0]))]
    return DatasetIndex(root, "nnunet", cases, labels, _modality_from_names(names), tests)


# --------------------------------------------------------------------------------------------
# Medical Segmentation Decathlon


def _is_msd(root: Path) -> bool:
    path = root / "dataset.json"
    return path.is_file() and isinstance(read_json_object(path).get("training"), list)


def _discover_msd(root: Path) -> DatasetIndex:
    meta_path = root / "dataset.json"
    meta = read_json_object(meta_path)

    def resolve(rel: str) -> Path:
        path = (root / rel).resolve()
        if not path.is_file():
            raise DataError(f"{path}: listed in {meta_path} but not found")
        return path

    cases = []
    for entry in meta["training"]:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DataError(f"{meta_path}: training entry {entry!r} lacks 'image' / 'label'")
        image = resolve(entry["image"])
        case_id = split_suffix(image)[0]
        cases.append(Case(case_id, case_id, [image], resolve(entry["label"])))
    tests = []
    for rel in meta.get("test", []):
        image = resolve(rel if isinstance(rel, str) else rel["image"])
        case_id = split_suffix(image)[0]
        tests.append(Case(case_id, case_id, [image], None))
    labels = labels_from_mapping(meta["labels"], meta_path) if meta.get("labels") else None
    modality = None
    if isinstance(meta.get("modality"), dict):
        modality = _modality_from_names([str(v) for v in meta["modality"].values()])
    return DatasetIndex(root, "msd", sorted(cases, key=lambda c: c.id), labels, modality,
                        sorted(tests, key=lambda c: c.id))


# --------------------------------------------------------------------------------------------
# ACDC

_ACDC_FRAME = re.compile(r"^(patient\d+)_frame(\d+)\.nii(\.gz)?$")


def _acdc_patient_dirs(root: Path) -> list[Path]:
    dirs = [p for p in root.glob("patient*") if p.is_dir()]
    for sub in ("training", "testing"):
        if (root / sub).is_dir():
            dirs += [p for p in (root / sub).glob("patient*") if p.is_dir()]
    return sorted(dirs)


def _is_acdc(root: Path) -> bool:
    return any(
        _ACDC_FRAME.match(f.name) for d in _acdc_patient_dirs(root) for f in d.iterdir()
    )


def _read_info_cfg(path: Path) -> dict[str, str]:
    """Parse ACDC ``Info.cfg`` (``Key: value`` lines)."""
    info = {}
    for line in path.read_text().splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            info[key.strip()] = value.strip()
    return info


def _discover_acdc(root: Path) -> DatasetIndex:
    cases, tests = [], []
    for patient_dir in _acdc_patient_dirs(root):
        phases: dict[int, str] = {}
        info_path = patient_dir / "Info.cfg"
        if info_path.is_file():
            info = _read_info_cfg(info_path)
            for phase in ("ED", "ES"):
                if info.get(phase, "").isdigit():
                    phases[int(info[phase])] = phase
        for image in sorted(patient_dir.iterdir()):
            match = _ACDC_FRAME.match(image.name)
            if not match:  # _gt labels, _4d cine volumes, Info.cfg
                continue
            patient, frame = match.group(1), int(match.group(2))
            case_id = split_suffix(image)[0]
            label = image.with_name(f"{case_id}_gt{split_suffix(image)[1]}")
            case = Case(case_id, patient, [image], label if label.is_file() else None,
                        phases.get(frame))
            (cases if case.label is not None else tests).append(case)
    return DatasetIndex(root, "acdc", cases, dict(ACDC_LABELS), "MRI", tests)


# --------------------------------------------------------------------------------------------
# ImageCAS and AortaSeg24: image / label pairs identified by a name pattern, any sub-folder


def _pairs(root: Path, image_glob: str, image_tag: str, label_tag: str) -> tuple[list[Case], list[Case]]:
    cases, tests = [], []
    for image in sorted(root.rglob(image_glob)):
        if image.name.startswith("."):
            continue
        stem, suffix = split_suffix(image)
        case_id = stem[: -len(image_tag)]
        candidates = sorted(root.rglob(f"{case_id}{label_tag}{suffix}"))
        label = candidates[0] if candidates else None
        (cases if label else tests).append(Case(case_id, case_id, [image], label))
    return cases, tests


def _discover_imagecas(root: Path) -> DatasetIndex:
    cases, tests = _pairs(root, "*.img.nii.gz", ".img", ".label")
    return DatasetIndex(root, "imagecas", cases, dict(IMAGECAS_LABELS), "CT", tests)


def _discover_aortaseg24(root: Path) -> DatasetIndex:
    cases, tests = _pairs(root, "*_CTA.mha", "_CTA", "_label")
    return DatasetIndex(root, "aortaseg24", cases, dict(AORTASEG24_LABELS), "CT", tests)


# --------------------------------------------------------------------------------------------
# plain images/ + labels/


def _is_folder(root: Path) -> bool:
    if not (root / "labels").is_dir():
        return False
    return bool(_image_files(root / "images") or _dicom_folders(root / "images"))


def _discover_folder(root: Path) -> DatasetIndex:
    labels = {split_suffix(p)[0]: p for p in _image_files(root / "labels")}
    images = {split_suffix(p)[0]: p for p in _image_files(root / "images")}
    for folder in _dicom_folders(root / "images"):
        if folder.name in images:
            raise DataError(f"{folder}: duplicate case id '{folder.name}' in {root} (also "
                            f"{images[folder.name].name})")
        images[folder.name] = folder
    orphans = [(labels[s], f"label without a matching image in {root / 'images'}")
               for s in sorted(set(labels) - set(images))]
    cases = [Case(s, s, [p], labels[s]) for s, p in sorted(images.items()) if s in labels]
    tests = [Case(s, s, [p], None) for s, p in sorted(images.items()) if s not in labels]
    names, modality = _optional_metadata(root / "dataset.json")
    return DatasetIndex(root, "folder", cases, names, modality, tests, orphans)


def _optional_metadata(path: Path) -> tuple[dict[int, str] | None, str | None]:
    """Labels and modality from an optional ``dataset.json`` beside a plain folder layout.

    ``labels`` may map value -> name (MSD) or name -> value (nnU-Net v2); the modality is
    taken from ``modality`` / ``channel_names`` when its first channel says CT or MR(I).
    """
    if not path.is_file():
        return None, None
    data = read_json_object(path)
    raw = data.get("labels")
    labels = None
    if isinstance(raw, dict) and raw:
        labels = labels_from_mapping(raw, path)
    channels = data.get("modality") or data.get("channel_names") or {}
    first = str(next(iter(channels.values()), "")).upper() if isinstance(channels, dict) else ""
    modality = "CT" if first.startswith("CT") else "MRI" if first.startswith("MR") else None
    return labels, modality


_DETECTORS = (
    ("nnunet", _is_nnunet),
    ("msd", _is_msd),
    ("acdc", _is_acdc),
    ("imagecas", lambda r: any(r.rglob("*.img.nii.gz"))),
    ("aortaseg24", lambda r: any(r.rglob("*_CTA.mha"))),
    ("folder", _is_folder),
)
_DISCOVER = {
    "nnunet": _discover_nnunet,
    "msd": _discover_msd,
    "acdc": _discover_acdc,
    "imagecas": _discover_imagecas,
    "aortaseg24": _discover_aortaseg24,
    "folder": _discover_folder,
}


def detect_layout(root: str | Path) -> str:
    """Return the first layout (in the module's documented order) that ``root`` matches.

    Raises:
        DataError: ``root`` is not a folder or matches no layout.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    for name, matches in _DETECTORS:
        if matches(root):
            return name
    raise DataError(
        f"{root}: no known dataset layout (looked for nnU-Net dataset.json + imagesTr/, MSD "
        "dataset.json 'training' list, ACDC patientXXX/ folders, ImageCAS *.img.nii.gz, "
        "AortaSeg24 *_CTA.mha, or images/ + labels/)"
    )


def discover(root: str | Path, layout: str = "auto") -> DatasetIndex:
    """Index the cases of a dataset folder.

    Args:
        root: dataset folder.
        layout: ``"auto"`` (detect, see module docstring for the order) or one of
            :data:`LAYOUTS` (the ``dataset.layout`` config key).

    Returns:
        A :class:`DatasetIndex`; labelled cases and test images sorted by id.

    Raises:
        DataError: the folder is missing, matches no layout, has no labelled case, or is
            internally inconsistent (missing channel / label file, duplicate case id).
        ValueError: ``layout`` is not a known name.
    """
    root = Path(root)
    if layout == "auto":
        layout = detect_layout(root)
    elif layout not in _DISCOVER:
        raise ValueError(f"layout={layout!r}: expected 'auto' or one of {', '.join(LAYOUTS)}")
    elif not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    index = _DISCOVER[layout](root)
    if not index.cases:
        raise DataError(f"{root}: no labelled case found for layout '{layout}'")
    seen: set[str] = set()
    for case in index.cases + index.test_images:
        if case.id in seen:
            raise DataError(f"{case.images[0]}: duplicate case id '{case.id}' in {root}")
        seen.add(case.id)
    return index
