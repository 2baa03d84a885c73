"""Standard terminology (DICOM / SNOMED CT codes) for segment names, as 3D Slicer stores it.

A Slicer segment carries a ``TerminologyEntry`` tag: context name, category, type, optional
type modifier, anatomic context and region, each a ``(scheme, code value, code meaning)``
triplet (DICOM PS3.3 Segment Description: Segmented Property Category / Type / Type Modifier
Code Sequences). This module maps the label names cardiovascular datasets use (ACDC "RV",
nnU-Net "MLV", AortaSeg24 "Zone 3", ImageCAS "coronary artery", ...) to such entries.

Code values are SNOMED CT (designator ``SCT``) body-structure concepts as listed in DICOM
PS3.16 (Annex L anatomic regions, the codes DICOM SEG writers use), and as the 3D Slicer
TotalSegmentator extension maps the same structures. Where no concept exists for the exact
structure the nearest containing one is used: the ventricular blood pools map to the
ventricle concepts (as TotalSegmentator's heart chambers do), the left-ventricular myocardium
to "Myocardium", AortaSeg24 zones 0-9 to the aortic segment that contains them (SVS zone
definitions, Fillinger et al. 2010). Unknown names fall back to the generic "Tissue" entry
that Slicer itself assigns to new segments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CONTEXT_NAME = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT_NAME = "Anatomic codes - DICOM master list"

Code = tuple[str, str, str]
"""(coding scheme designator, code value, code meaning), e.g. ("SCT", "15825003", "Aorta")."""

ANATOMICAL_STRUCTURE: Code = ("SCT", "123037004", "Anatomical Structure")
TISSUE: Code = ("SCT", "85756007", "Tissue")
LEFT: Code = ("SCT", "7771000", "Left")
RIGHT: Code = ("SCT", "24028007", "Right")


@dataclass(frozen=True)
class Terminology:
    """One segment's terminology entry plus the display colour recommended for it.

    Attributes:
        category: segmented property category code.
        type: segmented property type code.
        type_modifier: optional modifier (laterality: ``LEFT`` / ``RIGHT``).
        color: recommended display colour, RGB in [0, 1]; ``None`` lets the caller pick one.
    """

    category: Code
    type: Code
    type_modifier: Code | None = None
    color: tuple[float, float, float] | None = None

    @property
    def is_generic(self) -> bool:
        """True for the "Tissue" fallback (no standard concept matched the name)."""
        return self.type == TISSUE

    def with_laterality(self, side: Code) -> Terminology:
        """The same entry with a Left / Right type modifier (colour left to the caller)."""
        return Terminology(self.category, self.type, side, None)

    def to_slicerio(self) -> dict:
        """The entry as the ``terminology`` dict of a slicerio segment.

        slicerio serialises it as Slicer's string form
        ``context~category~type~type modifier~anatomic context~region~region modifier``
        with each code written ``scheme^value^meaning``.
        """
        entry = {
            "contextName": CONTEXT_NAME,
            "category": list(self.category),
            "type": list(self.type),
            "anatomicContextName": ANATOMIC_CONTEXT_NAME,
        }
        if self.type_modifier is not None:
            entry["typeModifier"] = list(self.type_modifier)
        return entry


def _rgb(r: int, g: int, b: int) -> tuple[float, float, float]:
    return (r / 255.0, g / 255.0, b / 255.0)


def _structure(value: str, meaning: str, color: tuple[float, float, float] | None = None) -> Terminology:
    return Terminology(ANATOMICAL_STRUCTURE, ("SCT", value, meaning), None, color)


GENERIC = Terminology(TISSUE, TISSUE)
"""Slicer's default entry for a segment of unknown meaning."""

# Structures, keyed by a canonical name. Colours are chosen to be distinct from each other
# and close to the usual cardiac-MRI convention (RV blue, myocardium green, LV red).
STRUCTURES: dict[str, Terminology] = {
    "right ventricle": _structure("53085002", "Right ventricle", _rgb(70, 120, 225)),
    "left ventricle": _structure("87878005", "Left ventricle", _rgb(220, 60, 60)),
    "myocardium": _structure("74281007", "Myocardium", _rgb(95, 185, 90)),
    "left atrium": _structure("82471001", "Left atrium", _rgb(235, 150, 55)),
    "right atrium": _structure("73829009", "Right atrium", _rgb(150, 110, 220)),
    "heart": _structure("80891009", "Heart", _rgb(205, 110, 125)),
    "aorta": _structure("15825003", "Aorta", _rgb(240, 130, 150)),
    "ascending aorta": _structure("54247002", "Ascending aorta", _rgb(250, 165, 180)),
    "aortic arch": _structure("57034009", "Aortic arch", _rgb(200, 90, 160)),
    "descending aorta": _structure("32672002", "Descending aorta", _rgb(170, 70, 110)),
    "thoracic aorta": _structure("113262008", "Thoracic aorta", _rgb(230, 100, 120)),
    "abdominal aorta": _structure("7832008", "Abdominal aorta", _rgb(185, 120, 200)),
    "coronary artery": _structure("41801008", "Coronary artery", _rgb(250, 205, 60)),
    "pulmonary artery": _structure("81040000", "Pulmonary artery", _rgb(0, 150, 200)),
    "pulmonary vein": _structure("122972007", "Pulmonary vein", _rgb(110, 200, 230)),
    "superior vena cava": _structure("48345005", "Superior vena cava", _rgb(40, 80, 160)),
    "inferior vena cava": _structure("64131007", "Inferior vena cava", _rgb(60, 100, 190)),
    "brachiocephalic artery": _structure("12691009", "Innominate artery", _rgb(255, 120, 80)),
    "common carotid artery": _structure("32062004", "Common carotid artery", _rgb(255, 170, 90)),
    "subclavian artery": _structure("36765005", "Subclavian artery", _rgb(230, 200, 120)),
    "celiac artery": _structure("57850000", "Celiac artery", _rgb(140, 210, 120)),
    "superior mesenteric artery": _structure("42258001", "Superior mesenteric artery", _rgb(60, 170, 140)),
    "renal artery": _structure("2841007", "Renal artery", _rgb(180, 220, 70)),
    "common iliac artery": _structure("73634005", "Common iliac artery", _rgb(120, 160, 60)),
    "internal iliac artery": _structure("90024005", "Internal iliac artery", _rgb(90, 140, 100)),
    "external iliac artery": _structure("113269004", "External iliac artery", _rgb(160, 190, 110)),
}

# Names used by datasets and papers (normalised: lower case, words separated by one space).
ALIASES: dict[str, str] = {
    # ACDC / M&Ms / nnU-Net Task027 short-axis labels
    "rv": "right ventricle", "rvc": "right ventricle", "rv cavity": "right ventricle",
    "right ventricle cavity": "right ventricle", "right ventricular cavity": "right ventricle",
    "right ventricle blood pool": "right ventricle", "rv blood pool": "right ventricle",
    "lv": "left ventricle", "lvc": "left ventricle", "lv cavity": "left ventricle",
    "left ventricle cavity": "left ventricle", "left ventricular cavity": "left ventricle",
    "left ventricle blood pool": "left ventricle", "lv blood pool": "left ventricle",
    "lvbp": "left ventricle",
    "myo": "myocardium", "mlv": "myocardium", "lvm": "myocardium", "lv myo": "myocardium",
    "lv myocardium": "myocardium", "left ventricle myocardium": "myocardium",
    "left ventricular myocardium": "myocardium", "myocardium of left ventricle": "myocardium",
    "myocardium of the left ventricle": "myocardium", "heart myocardium": "myocardium",
    # whole-heart (MM-WHS) and great vessels
    "la": "left atrium", "ra": "right atrium", "left atrial cavity": "left atrium",
    "right atrial cavity": "right atrium",
    "ao": "aorta", "aa": "ascending aorta", "asc aorta": "ascending aorta",
    "arch of aorta": "aortic arch", "desc aorta": "descending aorta",
    "pa": "pulmonary artery", "pulmonary trunk": "pulmonary artery",
    "pulmonary veins": "pulmonary vein", "svc": "superior vena cava",
    "ivc": "inferior vena cava",
    # coronary CTA (ImageCAS, ASOCA)
    "coronary arteries": "coronary artery", "coronary": "coronary artery",
    "coronaries": "coronary artery",
    # AortaSeg24 branches
    "innominate": "brachiocephalic artery", "innominate artery": "brachiocephalic artery",
    "brachiocephalic trunk": "brachiocephalic artery",
    "common carotid": "common carotid artery", "carotid": "common carotid artery",
    "subclavian": "subclavian artery", "celiac trunk": "celiac artery",
    "celiac": "celiac artery", "coeliac trunk": "celiac artery", "sma": "superior mesenteric artery",
    "renal": "renal artery", "common iliac": "common iliac artery",
    "internal iliac": "internal iliac artery", "external iliac": "external iliac artery",
}

# AortaSeg24 / SVS aortic zones: zone -> containing structure.
_ZONES = {0: "aorta", 1: "aortic arch", 2: "aortic arch", 3: "thoracic aorta",
          4: "thoracic aorta", 5: "thoracic aorta", 6: "abdominal aorta", 7: "abdominal aorta",
          8: "abdominal aorta", 9: "abdominal aorta", 10: "common iliac artery",
          11: "external iliac artery"}
_LATERALITY_WORDS = {"left": LEFT, "l": LEFT, "lt": LEFT, "right": RIGHT, "r": RIGHT, "rt": RIGHT}


def normalize_name(name: str) -> str:
    """Lower-case ``name`` and turn ``_``, ``-``, ``.``, ``/`` and runs of spaces into one space."""
    return " ".join(re.split(r"[\s_\-./]+", name.strip().lower())).strip()


def _lookup_base(name: str) -> Terminology | None:
    canonical = ALIASES.get(name, name)
    if canonical in STRUCTURES:
        return STRUCTURES[canonical]
    zone = re.fullmatch(r"zone (\d+)", name)
    if zone and int(zone.group(1)) in _ZONES:
        return STRUCTURES[_ZONES[int(zone.group(1))]]
    return None


def lookup_terminology(name: str) -> Terminology:
    """Terminology entry for a label name; the generic "Tissue" entry when none is known.

    The whole normalised name is looked up first ("left ventricle" is a structure, not a
    laterality); then a leading or trailing laterality word ("left", "R", ...) is split off,
    the rest looked up, and the side added as type modifier ("Left subclavian artery",
    "Zone 10 R").

    Args:
        name: the label name from dataset.json / ``--labels`` (any case and separators).

    Returns:
        A :class:`Terminology`; ``.is_generic`` tells whether a standard concept matched.
    """
    key = normalize_name(name)
    found = _lookup_base(key)
    if found is not None:
        return found
    words = key.split(" ")
    if len(words) > 1:
        for side_word, rest in ((words[0], words[1:]), (words[-1], words[:-1])):
            side = _LATERALITY_WORDS.get(side_word)
            base = _lookup_base(" ".join(rest)) if side is not None else None
            if base is not None:
                return base.with_laterality(side)
    return GENERIC
