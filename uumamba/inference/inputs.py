"""What ``predict`` segments: the cases of an input file or folder, and where it may write.

A case is one image, or one file per input channel named with nnU-Net's ``CASE_0000``,
``CASE_0001`` ... convention. The output folder must not be the input's own folder (masks named
like their images would overwrite the scans).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from uumamba.data.layouts import IMAGE_SUFFIXES, split_suffix
from uumamba.errors import UserError
from uumamba.utils import check_output_folder

#: Stem endings of reference label maps that sit beside their images (ACDC ``_gt``).
LABEL_TAGS = ("_gt", "_seg")
log = logging.getLogger(__name__)
_CHANNEL_TAG = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_FRAME_TAG = re.compile(r"^(?P<patient>.+)_frame\d+$")


#: Side files written beside a case's mask in its format (``CASE_probabilities`` ...): no case
#: may be named like them. ``--split-4d`` also writes ``CASE_frameNN``.
_SIDE_TAGS = ("_probabilities", "_entropy")

#: Folders a linked folder may not lead into (device files, kernel tables, not images).
_SYSTEM_ROOTS = ("/proc", "/sys", "/dev")


def input_cases(input_path: Path, n_channels: int, output_dir: Path | None = None,
                split_4d: bool = False) -> list[tuple[str, list[Path]]]:
    """Cases in a file or folder: (case id, one file per channel).

    nnU-Net naming ``CASE_0000`` (``_0001`` ...) groups channels; the suffix is dropped from
    the case id (so ``imagesTs/CASE_0000.nii.gz`` gives ``CASE``). A folder with no image
    file directly in it is searched below (:func:`_image_files`): one patient per sub-folder,
    as ACDC is downloaded (``patientXXX/patientXXX_frameNN.nii.gz``); ``output_dir`` must
    then lie outside ``input_path`` (its masks could replace scans, and a later run would take
    them for scans). The masks are written side by side, so case ids must be unique, also against the side files and (``split_4d``)
    frames of the other cases. Hidden files and folders, Slicer ``.seg.nrrd`` files and
    reference label maps named ``*_gt`` (ACDC) or ``*_seg`` are skipped (with a warning for the
    label maps: a patient folder holds both), and so is an ACDC cine series ``PATIENT_4d``
    beside that patient's ``PATIENT_frameNN`` frames (warned).

    Raises:
        UserError: no such path; a folder without image files (below it either); two files
            that would be written as the same case or one case named like another's side
            file or frame; ``output_dir`` inside a folder searched below; a multi-channel
            model given files not named ``CASE_0000`` ... (each message names the path).
    """
    if input_path.is_file():
        files = [input_path]
    elif input_path.is_dir():
        files, below = _image_files(input_path)
        if below and output_dir is not None:
            _check_output_outside(input_path, output_dir)
        labels = {p for p in files if split_suffix(p)[0].endswith(LABEL_TAGS)}
        if labels:
            first = min(labels)
            log.warning(f"warning: {input_path}: skipping {len(labels)} label map(s) named like "
                        f"reference segmentations ({', '.join(LABEL_TAGS)}), e.g. {first.name}")
            files = [p for p in files if p not in labels]
        cines = _cines_beside_their_frames(files)
        if cines:
            log.warning(f"warning: {input_path}: skipping {len(cines)} cine series beside their "
                        f"own ED / ES frames (ACDC), e.g. {min(cines).name}; give one as --input "
                        "with --split-4d to segment all its frames")
            files = [p for p in files if p not in cines]  # a set: linear in the files
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
    _check_side_names(groups, split_4d)
    return [(case, [chans[c] for c in sorted(chans)]) for case, chans in sorted(groups.items())]


def _check_output_outside(input_path: Path, output_dir: Path) -> None:
    """Refuse an output folder inside an input folder that is searched below: masks written
    there could replace scans of that sub-folder, and the next run would take them for scans."""
    root, out = input_path.resolve(), output_dir.resolve()
    if out == root or root in out.parents:
        raise UserError(f"--output {output_dir} is inside --input {input_path}, whose "
                        "sub-folders are searched for images: masks there could replace scans "
                        "and be read as scans by the next run; choose a folder outside it")


def _check_side_names(groups: dict[str, dict[int, Path]], split_4d: bool) -> None:
    """Refuse a case named like another case's side file (``CASE_probabilities`` ...) or, with
    ``split_4d``, its frames (``CASE_frameNN``): one output would overwrite the other."""
    for case in groups:
        for tag in _SIDE_TAGS:
            if case.endswith(tag) and case[:-len(tag)] in groups:
                owner = case[:-len(tag)]
                raise UserError(f"{next(iter(groups[case].values()))}: case '{case}' would be "
                                f"overwritten by the {tag[1:]} file of case '{owner}' "
                                f"({next(iter(groups[owner].values()))}); rename one of them")
        m = _FRAME_TAG.fullmatch(case)
        if split_4d and m and m["patient"] in groups:
            raise UserError(f"{next(iter(groups[case].values()))}: case '{case}' is also the name "
                            f"of a frame of '{m['patient']}' (--split-4d); rename one of them")


def _cines_beside_their_frames(files: list[Path]) -> set[Path]:
    """ACDC's ``PATIENT_4d`` files whose folder also holds a ``PATIENT_frameNN`` image."""
    stems = [(f, split_suffix(f)[0]) for f in files]
    framed = {(f.parent, m["patient"]) for f, stem in stems if (m := _FRAME_TAG.match(stem))}
    return {f for f, stem in stems if stem.endswith("_4d") and (f.parent, stem[:-3]) in framed}


def _is_image(path: Path) -> bool:
    try:
        return (not path.name.startswith(".") and split_suffix(path)[1] in IMAGE_SUFFIXES
                and not split_suffix(path)[0].endswith(".seg") and path.is_file())
    except OSError:  # a link into a folder this user may not read: not an image we can use
        return False


def _image_files(folder: Path) -> tuple[list[Path], bool]:
    """(image files, searched below): those directly in ``folder``; when there are none, those
    of its sub-folders, all levels, sorted by path. Hidden folders are skipped; linked folders
    are followed once each (a loop ends), never into /proc, /sys or /dev; folders that cannot
    be listed are reported and skipped. Iterative: any depth, no recursion limit."""
    direct = sorted(p for p in _entries(folder) if _is_image(p))
    if direct:
        return direct, False
    st = folder.stat()
    seen = {(st.st_dev, st.st_ino)}
    found: list[Path] = []
    stack = [folder]
    while stack:
        current = stack.pop()
        for entry in _entries(current):
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    real = os.path.realpath(entry) if entry.is_symlink() else str(entry)
                    if any(real == r or real.startswith(r + "/") for r in _SYSTEM_ROOTS):
                        continue
                    st = entry.stat()
                    key = (st.st_dev, st.st_ino)
                    if key not in seen:
                        seen.add(key)
                        stack.append(entry)
                elif _is_image(entry):
                    found.append(entry)
            except OSError:
                continue
    return sorted(found), True


def _entries(folder: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(folder)]
    except OSError as exc:
        log.warning(f"warning: {folder}: cannot list this folder ({exc.strerror}); skipped")
        return []


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
