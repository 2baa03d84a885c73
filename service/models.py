"""Pydantic models of the REST API: every request option and response body, with examples.

These models are the OpenAPI schema (``/openapi.json``, ``/docs``); field descriptions are the
API documentation, so each one states its unit.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field


class OutputFormat(str, Enum):
    """What ``/v1/segment`` and job results return.

    ``nii.gz``: the label map as gzip NIfTI in the upload's voxel grid (header copied);
    ``seg.nrrd``: a 3D Slicer segmentation (names and colours per label);
    ``json``: per-class voxel counts and volumes in mL, no image;
    ``dcm``: a DICOM Segmentation referencing the slices of an uploaded ``.zip`` series.
    """

    nii_gz = "nii.gz"
    seg_nrrd = "seg.nrrd"
    json = "json"
    dcm = "dcm"


class JobState(str, Enum):
    """Life cycle of an asynchronous job: queued -> running -> done | failed | interrupted.

    ``interrupted``: the worker running it stopped (crash, restart, lost machine) and it was
    not queued again (``lost_jobs=interrupt``, or its attempts were used up); resubmit it.
    """

    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    interrupted = "interrupted"


class ErrorResponse(BaseModel):
    """Body of every 4xx / 5xx answer (FastAPI convention)."""

    detail: str = Field(description="What went wrong, naming the offending input.",
                        examples=["volume is 4D (shape [154, 154, 10, 30]); upload one 3D frame"])


class Health(BaseModel):
    """Liveness: the process answers."""

    status: str = Field(description="Always 'ok' when the process is alive.", examples=["ok"])


class Readiness(BaseModel):
    """Readiness: the model is loaded and requests will be served."""

    status: str = Field(description="'ready' (200) or 'loading' / 'failed' (503).", examples=["ready"])
    device: str | None = Field(default=None, description="Torch device the predictor runs on.", examples=["cuda:0"])
    scan_backend: str | None = Field(
        default=None, description="Selective-scan backend in use: cuda (mamba-ssm), cpu (numba) or torch.",
        examples=["cpu"])
    scan_backend_warning: str | None = Field(
        default=None, description="Why mamba-ssm's CUDA kernels are not used although wanted (auto on a GPU, "
        "or mamba-ssm installed): the backend that runs instead and the reason; null when none.",
        examples=[None])
    precision: str | None = Field(
        default=None, description="What the sliding windows compute in, under the model's inference.amp: "
        "with 'auto', bfloat16 on a GPU of compute capability 8.0+ or a CPU with AMX tiles or AVX512-BF16 (UUMAMBA_CPU_BF16=0|1 "
        "overrides the CPU detection), float16 on an older GPU, else float32; float32 with 'off'. Null until "
        "the model is loaded.", examples=["bfloat16"])
    detail: str | None = Field(default=None, description="Why the service is not ready (load error).")


class WeightsFile(BaseModel):
    """One checkpoint of the ensemble."""

    fold: str = Field(description="Fold folder name.", examples=["fold_0"])
    file: str = Field(description="Path relative to the model folder.", examples=["fold_0/checkpoint_best.pt"])
    sha256: str = Field(description="SHA-256 of the file, hex.",
                        examples=["9f2c4e0d5b3a...e1"])
    size_bytes: int = Field(description="File size in bytes.", examples=[25_165_824])


class ModelInfo(BaseModel):
    """What the loaded model is (``GET /v1/model``)."""

    model_config = ConfigDict(protected_namespaces=())

    name: str = Field(description="Model folder name.", examples=["acdc_umamba_bot"])
    version: str = Field(
        description="First 12 hex digits of the SHA-256 over the weights' hashes: changes "
                    "whenever any checkpoint changes.", examples=["3fa94c1b27de"])
    architecture: str = Field(description="Network: umamba_bot, umamba_enc or unet.", examples=["umamba_bot"])
    spatial_dims: int = Field(description="2 (slice-wise) or 3.", examples=[3])
    labels: dict[int, str] = Field(description="Label value -> name, background (0) included.",
                                   examples=[{0: "background", 1: "RV", 2: "MYO", 3: "LV"}])
    modality: str | None = Field(description="MRI or CT (decides the intensity normalisation).", examples=["MRI"])
    target_spacing_mm: list[float] = Field(description="Target spacing of the plan (in-plane, in-plane, slice axis) in mm.",
                                           examples=[[1.5, 1.5, 5.0]])
    resampling_spacing_mm: list[float] = Field(
        description="What a volume is resampled to, per plan axis, in mm; 0 = the volume's own "
                    "spacing along that axis (a 2D model keeps each volume's slices).",
        examples=[[1.5, 1.5, 0.0]])
    patch_size: list[int] = Field(description="Sliding-window patch size in voxels.", examples=[[192, 192, 16]])
    folds: list[str] = Field(description="Folds ensembled at inference.", examples=[["fold_0", "fold_1"]])
    weights: list[WeightsFile] = Field(description="The checkpoint of every fold with its SHA-256.")
    tta_default: bool = Field(description="Mirroring test-time augmentation when the request does not say.",
                              examples=[False])
    package_version: str = Field(description="uumamba package version.", examples=["0.1.0"])


class VolumeSummary(BaseModel):
    """Per-class result of one segmentation (``format=json``)."""

    shape: list[int] = Field(description="Voxel grid of the upload (x, y, z).", examples=[[216, 256, 10]])
    spacing_mm: list[float] = Field(description="Voxel spacing of the upload in mm.", examples=[[1.56, 1.56, 10.0]])
    voxel_volume_ml: float = Field(description="Volume of one voxel in mL (product of spacing / 1000).",
                                   examples=[0.0244])
    voxel_counts: dict[str, int] = Field(description="Foreground label name -> number of voxels.",
                                         examples=[{"RV": 6210, "MYO": 5890, "LV": 7301}])
    volumes_ml: dict[str, float] = Field(description="Foreground label name -> volume in mL.",
                                         examples=[{"RV": 151.6, "MYO": 143.8, "LV": 178.2}])
    tta: bool = Field(description="Whether mirroring TTA was used.", examples=[False])
    precision: str | None = Field(
        default=None, description="What the sliding windows computed in: bfloat16, float16 or "
        "float32 (as /readyz reports it; CASE_volumes.json of `uumamba predict` records the same).",
        examples=["bfloat16"])
    warnings: list[str] = Field(
        default_factory=list,
        description="Why the model cannot have been trained for this input (blank, constant or "
                    "noise-like image, another modality, spacing or field of view far outside "
                    "training); empty when the input is plausible. File answers carry the count "
                    "in the `X-Input-Warnings` header.",
        examples=[[]])
    es: VolumeSummary | None = Field(
        default=None, description="The ES phase's summary when a second volume was uploaded in "
                                  "`file_es` (this summary is then the ED phase's, `file`).")
    clinical: ClinicalSummary | None = Field(
        default=None, description="Clinical indices when two phases were uploaded together.")


class ClinicalSummary(BaseModel):
    """Clinical indices of a two-phase upload (``file`` = ED, ``file_es`` = ES), computed by
    :mod:`uumamba.clinical` from the two masks' volumes."""

    pairing: str = Field(description="How ED and ES were assigned.",
                         examples=["as uploaded: 'file' = ED, 'file_es' = ES"])
    indices: dict[str, float | None] = Field(
        description="LV_/RV_ EDV_ml, ESV_ml, SV_ml (mL), EF_pct (%), MYO_mass_g (g, ED "
                    "myocardium x 1.05 g/mL); null where undefined (see `undefined`).",
        examples=[{"LV_EDV_ml": 148.4, "LV_ESV_ml": 42.0, "LV_SV_ml": 106.4,
                   "LV_EF_pct": 71.7, "MYO_mass_g": 166.4}])
    undefined: dict[str, str] = Field(default_factory=dict,
                                      description="Index -> why it is null (e.g. empty ES cavity).",
                                      examples=[{}])
    warnings: list[str] = Field(default_factory=list,
                                description="E.g. an ESV larger than the EDV (phases swapped?).",
                                examples=[[]])


VolumeSummary.model_rebuild()  # its `es` / `clinical` fields refer to models defined after it


class JobCreated(BaseModel):
    """Answer of ``POST /v1/jobs`` (202)."""

    id: str = Field(description="Job id (32 hex digits).", examples=["5d0c8a3f9b2e4f61a7c3d2e1f0a9b8c7"])
    status: JobState = Field(description="Initial state.", examples=["queued"])
    status_url: str = Field(description="Where to poll.", examples=["/v1/jobs/5d0c8a3f9b2e4f61a7c3d2e1f0a9b8c7"])
    result_url: str = Field(description="Where the result is once done.",
                            examples=["/v1/jobs/5d0c8a3f9b2e4f61a7c3d2e1f0a9b8c7/result"])


class JobStatus(BaseModel):
    """State of an asynchronous job (``GET /v1/jobs/{id}``)."""

    id: str = Field(description="Job id.", examples=["5d0c8a3f9b2e4f61a7c3d2e1f0a9b8c7"])
    status: JobState = Field(description="queued, running, done, failed or interrupted.", examples=["running"])
    stage: str = Field(description="Finer step: queued, reading, predicting, writing, done, failed.",
                       examples=["predicting"])
    progress: float = Field(ge=0.0, le=1.0, description="Fraction done, 0 to 1 (by stage).", examples=[0.1])
    format: OutputFormat = Field(description="Result format requested at submission.", examples=["nii.gz"])
    tta: bool | None = Field(description="TTA requested (null: the model default).", examples=[None])
    created_at: datetime = Field(description="Submission time (UTC).")
    started_at: datetime | None = Field(default=None, description="Start of inference (UTC).")
    finished_at: datetime | None = Field(default=None, description="End of inference (UTC).")
    expires_at: datetime | None = Field(
        default=None, description="When a finished job and its result are deleted (UTC).")
    error: str | None = Field(default=None, description="Why the job failed or was interrupted.")
    model_version: str | None = Field(default=None, description="Version of the model the job is "
                                      "for (`version` of `/v1/model` when submitted); only "
                                      "workers of that model run it.", examples=["3fa94c1b27de"])
    attempts: int = Field(default=0, ge=0, description="Times a worker took this job (more than "
                          "one when a worker was lost and the job was queued again).", examples=[1])
