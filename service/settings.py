"""Service configuration: one typed settings object read from arguments or ``UUMAMBA_*`` variables.

Every field can be given to :class:`ServiceSettings` directly or through the environment with
the ``UUMAMBA_`` prefix (``UUMAMBA_MAX_UPLOAD_MB=256``, ``UUMAMBA_API_KEY=...``,
``UUMAMBA_CORS_ORIGINS=https://viewer.example.org,https://pacs.example.org``). Arguments win
over the environment, as in pydantic-settings.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _memory_bounded_voxels() -> int:
    from uumamba.data.untrusted import memory_bounded_voxels

    return memory_bounded_voxels()


class ServiceSettings(BaseSettings):
    """Settings of the REST inference service.

    Attributes:
        model_dir: trained model folder (``config.yaml``, ``plans.json``, ``fold_K/``), as
            written by ``uumamba train``.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` for the predictor.
        folds: folds to ensemble (``None``: every fold present in the model folder).
        api_key: when set, every endpoint except ``/healthz`` and ``/readyz`` requires the
            header ``X-API-Key`` with this value (compared in constant time).
        max_upload_mb: largest accepted upload in MiB (the multipart body, so the file plus a
            few hundred bytes of form headers); larger uploads get 413 before being buffered.
        max_queue: requests allowed to wait for a worker (synchronous requests and jobs
            together); one more is answered 429 with ``Retry-After``.
        workers_per_device: inferences run at the same time (threads sharing one model).
        request_timeout_s: seconds a synchronous ``/v1/segment`` request may wait and run
            before the answer is 504 (jobs have no timeout; poll them).
        job_ttl_s: seconds a finished job (and its result file) is kept before it expires.
        cors_origins: origins allowed by CORS; empty (the default) disables CORS entirely.
        tmp_dir: parent folder for uploads and results (``None``: the system temp folder).
        retry_after_s: value of the ``Retry-After`` header on 429 / 503 answers (seconds).
        warmup: before reporting ready, segment one synthetic volume of the patch size, so
            that one-time costs (numba compilation of the CPU scan, cuDNN autotuning) are not
            paid by the first request.
        allowed_hosts: ``Host`` header values accepted (Starlette's ``TrustedHostMiddleware``;
            ``*`` wildcards as there). ``None`` (the default): ``uumamba serve`` allows
            localhost, 127.0.0.1, ::1 and the bound host; :func:`create_app` alone checks none.
        upload_timeout_s: seconds an upload (the whole multipart body) may take; a slower
            client gets 408 and its connection is closed.
        max_uploads_per_client: uploads one client address may stream at the same time (one
            more gets 429). max_concurrent_uploads: uploads of all clients at the same time.
        max_decoding: uploads decoded and checked at the same time (bounded semaphore; the
            others wait without holding a thread).
        max_inference_s: wall-time cap of one inference in seconds (sliding window cancelled
            within one window batch; synchronous requests get 504, jobs fail); ``None``: none.
        max_voxels / max_resampled_voxels: caps on an upload's declared voxels and on its
            voxels after resampling to the model's target spacing (defaults sized for a
            512 x 512 x 1000 CT; the resampled cap also to half this machine's memory at 64 B
            per voxel: :func:`uumamba.data.untrusted.memory_bounded_voxels`);
            max_voxel_bytes: declared voxels x item size, in bytes.
        state_dir: folder of the durable job store (``jobs.sqlite3`` and ``jobs/<id>/``), shared
            by every API process and ``uumamba worker`` of this host that names it; ``None``:
            :func:`default_state_dir` of the model (stable across restarts, never a fresh
            temporary folder).
        run_jobs: this process runs jobs on its inference pool; ``False``: it only stores them
            and ``uumamba worker`` processes run them.
        broker_url: ``redis://host:port/db``: jobs go to an RQ queue on that Redis, for
            ``uumamba worker --broker`` processes on any machine (the API process runs none).
        job_lease_s: seconds a worker's claim on a job lasts unless renewed (every quarter of
            it); a worker silent for longer has lost its job.
        job_max_attempts: times one job may be taken before a lost job is ``interrupted``.
        lost_jobs: ``requeue`` (a job whose worker was lost is queued again while attempts are
            left) or ``interrupt`` (marked ``interrupted`` at once).
        max_jobs / max_job_bytes: caps on stored jobs and their files; the oldest finished go
            first, and a submission beyond them is answered 503.
        max_waiting_jobs: queued jobs allowed when this process does not run them
            (``run_jobs`` false or a broker); one more is answered 429.
    """

    model_config = SettingsConfigDict(env_prefix="UUMAMBA_", extra="ignore")

    model_dir: Path
    device: str = "auto"
    folds: Annotated[list[str] | None, NoDecode] = None
    api_key: SecretStr | None = None
    max_upload_mb: float = Field(default=512.0, gt=0)
    max_queue: int = Field(default=8, ge=0)
    workers_per_device: int = Field(default=1, ge=1)
    request_timeout_s: float = Field(default=600.0, gt=0)
    job_ttl_s: float = Field(default=3600.0, gt=0)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    tmp_dir: Path | None = None
    retry_after_s: int = Field(default=5, ge=1)
    warmup: bool = True
    allowed_hosts: Annotated[list[str] | None, NoDecode] = None
    upload_timeout_s: float = Field(default=300.0, gt=0)
    max_uploads_per_client: int = Field(default=4, ge=1)
    max_concurrent_uploads: int = Field(default=16, ge=1)
    max_decoding: int = Field(default=2, ge=1)
    max_inference_s: float | None = Field(default=3600.0, gt=0)
    max_voxels: int = Field(default=512 * 512 * 1000, ge=1)
    max_resampled_voxels: int = Field(default_factory=_memory_bounded_voxels, ge=1)
    max_voxel_bytes: int = Field(default=2 * 1024**3, ge=1)
    state_dir: Path | None = None
    run_jobs: bool = True
    broker_url: str | None = None
    job_lease_s: float = Field(default=30.0, gt=0)
    job_max_attempts: int = Field(default=2, ge=1)
    lost_jobs: Literal["requeue", "interrupt"] = "requeue"
    max_jobs: int = Field(default=1000, ge=1)
    max_job_bytes: int = Field(default=20 * 1024**3, ge=1)
    max_waiting_jobs: int = Field(default=1000, ge=1)

    @field_validator("cors_origins", "folds", "allowed_hosts", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        """Accept ``"a,b"`` (environment style) as well as a list."""
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        """An empty ``UUMAMBA_API_KEY`` means no key, not a key that is the empty string."""
        if isinstance(value, str) and not value:
            return None
        return value

    @field_validator("broker_url", mode="before")
    @classmethod
    def _empty_broker_is_none(cls, value: object) -> object:
        """An empty ``UUMAMBA_BROKER_URL`` means no broker."""
        if isinstance(value, str) and not value:
            return None
        return value

    @property
    def resolved_state_dir(self) -> Path:
        """``state_dir``, or the model's :func:`default_state_dir`."""
        return Path(self.state_dir) if self.state_dir is not None else default_state_dir(self.model_dir)

    def job_store_options(self) -> dict:
        """Keyword arguments of either job store (lease, attempts, lost jobs, caps, and the
        bytes an upload still streaming is counted as)."""
        return dict(lease_s=self.job_lease_s, max_attempts=self.job_max_attempts,
                    lost_jobs=self.lost_jobs, max_jobs=self.max_jobs, max_bytes=self.max_job_bytes,
                    upload_reserve_bytes=self.max_upload_bytes)

    @classmethod
    def for_cli(cls, **values) -> ServiceSettings:
        """Settings from the command's values (``None``: not given, so the environment or the
        default decides) over ``UUMAMBA_*`` variables.

        Raises:
            UserError: one line listing every invalid setting by its variable name.
        """
        from pydantic import ValidationError

        from uumamba.errors import UserError

        try:
            return cls(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            problems = "; ".join(f"UUMAMBA_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}"
                                 for e in exc.errors())
            raise UserError(f"invalid service setting: {problems}") from None

    @property
    def max_upload_bytes(self) -> int:
        """``max_upload_mb`` in bytes (MiB, 1024 * 1024)."""
        return int(self.max_upload_mb * 1024 * 1024)

    def header_limits(self):
        """The :class:`uumamba.data.untrusted.HeaderLimits` of these settings."""
        from uumamba.data.untrusted import HeaderLimits

        return HeaderLimits(max_voxels=self.max_voxels, max_bytes=self.max_voxel_bytes,
                            max_resampled_voxels=self.max_resampled_voxels)


def default_state_dir(model_dir: Path) -> Path:
    """The stable per-user, per-model state folder: ``$XDG_STATE_HOME`` (default
    ``~/.local/state``) ``/uumamba/service/<model folder name>-<8 hex of its absolute path>``.

    Stable across restarts (so jobs survive them) and distinct per model folder (so two
    models served by one user never share jobs).
    """
    model = Path(model_dir).resolve()
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    digest = hashlib.sha256(str(model).encode()).hexdigest()[:8]
    return base / "uumamba" / "service" / f"{model.name}-{digest}"
