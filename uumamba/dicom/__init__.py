"""DICOM in and out: series discovery and geometry (:mod:`uumamba.data.dicom_series`, in the
data layer because image reading and dataset layouts use it), hostile ``.zip`` inputs
(``archive``), series as ``predict`` cases (``cases``), DICOM SEG writing (``seg``) and the
DICOMweb client of ``uumamba pacs`` (``web``). pydicom and highdicom load on first use."""
