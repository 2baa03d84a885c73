"""What ``predict`` segments: the cases of an input file or folder, and where it may write.

A case is one image, or one file per input channel named with nnU-Net's ``CASE_0000``,
``CASE_0001`` ... convention. The output folder must not be the input's own folder (masks named
like their images would overwrite the scans).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from uumamba.data.layouts import IMAGE_SUFFIXES, split_suffix
from uumamba.errors import UserError
from uumamba.utils import check_output_folder

#: Stem endings of reference label maps that sit beside their images (ACDC ``_gt``).
LABEL_TAGS = ("_gt", "_seg")
log = logging.getLogger(__name__)
_CHANNEL_TAG = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def input_cases(input_path: Path, n_channels: int) -> list[tuple[str, list[Path]]]:
    """Cases in a file or folder: (case id, one file per channel).

    nnU-Net naming ``CASE_0000`` (``_0001`` ...) groups channels; the suffix is dropped from
    the case id (so ``imagesTs/CASE_0000.nii.gz`` gives ``CASE``). A folder with no image
    file directly in it is searched below (:func:`_image_files`): one patient per sub-folder,
    as ACDC is downloaded (``patientXXX/patientXXX_frameNN.nii.gz``); the masks are written
    side by side, so case ids must be unique across sub-folders. Hidden files and folders,
    Slicer ``.seg.nrrd`` files and reference label maps named ``*_gt`` (ACDC) or ``*_seg`` are
    skipped (with a warning for the label maps: a patient folder holds both), and so is an ACDC
    cine series ``PATIENT_4d`` beside that patient's ``PATIENT_frameNN`` frames (warned).

    Raises:
        UserError: no such path; a folder without image files (below it either); two files
            that would be written as the same case; a multi-channel model given files not
            named ``CASE_0000`` ... (each message names the path).
    """
    if input_path.is_file():
        files = [input_path]
    elif input_path.is_dir():
        files = _image_files(input_path)
        labels = [p for p in files if split_suffix(p)[0].endswith(LABEL_TAGS)]
        if labels:
            log.warning(f"warning: {input_path}: skipping {len(labels)} label map(s) named like "
                        f"reference segmentations ({', '.join(LABEL_TAGS)}), e.g. {labels[0].name}")
            files = [p for p in files if p not in labels]
        cines = _cines_beside_their_frames(files)
        if cines:
            log.warning(f"warning: {input_path}: skipping {len(cines)} cine series beside their "
                        f"own ED / ES frames (ACDC), e.g. {cines[0].name}; give one as --input "
                        "with --split-4d to segment all its frames")
            files = [p for p in files if p not in cines]
        if not files:
            raise UserError(f"{input_path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it "
                            "or its sub-folders")
    else:
        raise UserError(f"--input {input_path}: no such file or folder")
    groups: dict[str, dict[int, Path]] = {}
    for f in files:
        stem = split_suffix(f)[0]
        m = _CHANNEL_TAG.match(stem)
        case, channel = (m["case"], int(m["channel"])) if m else (stem, 0)
        if not m and n_channels > 1:
            raise UserError(f"{f}: the model takes {n_channels} channels; name the files "
                            "CASE_0000, CASE_0001, ... (nnU-Net convention)")
        previous = groups.setdefault(case, {}).get(channel)
        if previous is not None:
            raise UserError(f"{f} and {previous} would both be written as case '{case}'; "
                            "rename one of them")
        groups[case][channel] = f
    return [(case, [chans[c] for c in sorted(chans)]) for case, chans in sorted(groups.items())]


def _cines_beside_their_frames(files: list[Path]) -> list[Path]:
    """ACDC's ``PATIENT_4d`` files whose folder also holds a ``PATIENT_frameNN`` image."""
    stems = {(f.parent, split_suffix(f)[0]) for f in files}
    out = []
    for f in files:
        stem = split_suffix(f)[0]
        if stem.endswith("_4d") and any(
                parent == f.parent and re.fullmatch(re.escape(stem[:-3]) + r"_frame\d+", other)
                for parent, other in stems):
            out.append(f)
    return out


def _is_image(path: Path) -> bool:
    return (path.is_file() and not path.name.startswith(".")
            and split_suffix(path)[1] in IMAGE_SUFFIXES and not split_suffix(path)[0].endswith(".seg"))


def _image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder``; when there are none, those of its sub-folders, all
    levels (hidden folders skipped; linked folders followed once each, so a link loop ends),
    sorted by path."""
    direct = sorted(p for p in folder.iterdir() if _is_image(p))
    if direct:
        return direct
    import os

    found: list[Path] = []
    seen = {os.path.realpath(folder)}
    for parent, dirs, names in os.walk(folder, followlinks=True):
        kept = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(parent, d))
            if not d.startswith(".") and real not in seen:
                seen.add(real)
                kept.append(d)
        dirs[:] = kept
        found.extend(p for p in (Path(parent) / n for n in names) if _is_image(p))
    return sorted(found)


def check_output_dir(input_path: Path, output_dir: Path) -> None:
    """Refuse an output folder that is a file or the input's own folder (masks named like
    their images would overwrite the scans).

    Raises:
        UserError: naming ``--output`` and the reason.
    """
    check_output_folder(output_dir)
    input_dir = input_path if input_path.is_dir() else input_path.parent
    if output_dir.exists() and output_dir.resolve() == input_dir.resolve():
        raise UserError(f"--output {output_dir} is the input folder: masks would overwrite the "
                        "input images; choose another folder")


def is_dicom_input(input_path: Path) -> bool:
    """True for a ``.zip`` file, or a folder holding no NIfTI / NRRD / MHA image directly but
    DICOM Part 10 files somewhere below it (:mod:`uumamba.dicom.cases` reads those)."""
    if input_path.is_file():
        return input_path.name.lower().endswith(".zip")
    if not input_path.is_dir():
        return False
    if any(p.is_file() and split_suffix(p)[1] in IMAGE_SUFFIXES for p in input_path.iterdir()):
        return False
    from uumamba.dicom.cases import looks_like_dicom

    return looks_like_dicom(input_path)
