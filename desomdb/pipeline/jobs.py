"""Job files users run (``ingest/*.toml``): a typed schema, validated on load.

A job file has the sections ``[job]`` (what: release, cubes, drpall, truth), ``[binning]``
and ``[quality]`` (how the cubes are binned and flagged), ``[run]`` (where: workers, Dask
scheduler) and, for ``desomdb refresh``, ``[refresh]``. Each section accepts exactly its own
keys with their types (pydantic), so a misspelt key or a key in the wrong section is an
error that names the file, the section and the key. Relative paths are resolved against the
job file's folder.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from desomdb.errors import ConfigError


@dataclass
class IngestConfig:
    """Binning and quality parameters of an ingest job (sections ``[binning]``, ``[quality]``)."""

    target_snr: float = 20.0
    min_spaxel_snr: float = 2.0
    #: vorbin's final step: the CVT of Cappellari & Copin (2003) (False, the default) or the
    #: WVT of Diehl & Statler (2006) (True, vorbin's and the MaNGA DAP's default; ~4x slower).
    wvt: bool = False
    min_good_bins: int = 3900
    train_min_snr: float = 10.0
    tail_fraction: float = 0.005

    def binning_key(self) -> str:
        """Return the settings that decide a cube's bins (``cubes.binning_config``).

        A cube is carried over or skipped only when its recorded key equals the job's.
        """
        step = "wvt" if self.wvt else "cvt"
        return (f"vorbin {step} target_snr={self.target_snr:g} "
                f"min_spaxel_snr={self.min_spaxel_snr:g}")


@dataclass
class IngestJob:
    """What to ingest: a release's cubes and drpall, and how."""

    release: str
    cubes: str
    drpall: str
    truth: str | None = None
    workers: int = 2
    cubes_per_task: int = 2
    scheduler: str | None = None
    config: IngestConfig = field(default_factory=IngestConfig)
    #: Carry cubes unchanged since an earlier release over (same checksum and drpall inputs)
    #: instead of processing them again.
    reuse: bool = True


@dataclass
class RefreshOptions:
    """What a refresh does after ingesting (section ``[refresh]``)."""

    retrain: bool = False
    label_max_per_cube: int | None = None
    device: str = "cpu"
    fingerprints: bool = True
    #: With a current model: label through the labelling plan (fraction or count, as
    #: ``desomdb label --plan --budget``) after assigning, instead of fitting every new baxel.
    label_budget: float | None = None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Job(_Section):
    """What to ingest."""

    release: str = Field(description="Data release name the cubes are stored under, e.g. "
                                     "DR15, DR17.")
    cubes: str = Field(description="Folder searched recursively for "
                                   "manga-*-LOGCUBE.fits[.gz], or a glob.")
    drpall: str = Field(description="The release's drpall FITS file (redshifts, NSA "
                                    "columns).")
    truth: str | None = Field(default=None, description="Mock surveys only: the per-spaxel "
                              "truth sidecar (Parquet) that desomdb mock writes.")


class _Binning(_Section):
    """How cubes are binned (vorbin)."""

    target_snr: float = Field(default=20.0, gt=0, description="Voronoi target S/N per bin "
                              "(per spectral pixel, covariance-corrected).")
    min_spaxel_snr: float = Field(default=2.0, ge=0, description="Spaxels below this S/N "
                                  "are left out of every bin (bin_id -1).")
    wvt: bool = Field(default=False, description="vorbin's final step: false = CVT "
                      "(Cappellari & Copin 2003), true = WVT (Diehl & Statler 2006; ~4x "
                      "slower, the MaNGA DAP's choice).")


class _Quality(_Section):
    """The paper's quality flags (stored, never deletions)."""

    min_good_bins: int = Field(default=3900, ge=0, description="Fewer good spectral bins "
                               "(of 4544) flags a baxel flag_few_good.")
    train_min_snr: float = Field(default=10.0, ge=0, description="Bins below this S/N are "
                                 "flagged flag_low_snr and not trained on.")
    tail_fraction: float = Field(default=0.005, ge=0, lt=0.5, description="Fraction of the "
                                 "release flagged at each flux tail (lowest minimum, highest "
                                 "maximum normalised flux off emission lines).")


class _Run(_Section):
    """Where the job runs."""

    workers: int = Field(default=2, ge=1, description="Local worker processes (one BLAS "
                         "thread each).")
    cubes_per_task: int = Field(default=2, ge=1, description="Cubes per task handed to a "
                                "worker.")
    scheduler: str | None = Field(default=None, description="A Dask scheduler address "
                                  "(tcp://HOST:PORT) or scheduler file (*.json) instead of "
                                  "local workers.")
    reuse: bool = Field(default=True, description="Carry cubes unchanged since an earlier "
                        "release (same checksum and drpall inputs) over instead of "
                        "processing them again.")


class _Refresh(_Section):
    """What desomdb refresh does after ingesting."""

    retrain: bool = Field(default=False, description="Train a new DESOM-1 on the refreshed "
                          "archive (a new model version; the current one is kept).")
    label_max_per_cube: int | None = Field(default=None, ge=1, description="Fit at most "
                                           "this many baxels per new cube (evenly spaced); "
                                           "none: every baxel.")
    device: Literal["cpu", "cuda"] = Field(default="cpu", description="torch device for "
                                           "training and the batched fitter.")
    fingerprints: bool = Field(default=True, description="Rebuild fingerprints and DESOM-2 "
                               "assignments at the end.")
    label_budget: float | None = Field(default=None, gt=0, description="With a current "
                                       "model: label through the labelling plan (a fraction "
                                       "of the baxels, or a count), as desomdb label --plan "
                                       "--budget, instead of fitting every new baxel.")


class _JobFile(_Section):
    job: _Job
    binning: _Binning = Field(default_factory=_Binning)
    quality: _Quality = Field(default_factory=_Quality)
    run: _Run = Field(default_factory=_Run)
    refresh: _Refresh = Field(default_factory=_Refresh)


#: Units of the job-file keys that have one (the docs' job-file reference prints them).
UNITS = {"target_snr": "per spectral pixel", "min_spaxel_snr": "per spectral pixel",
         "min_good_bins": "spectral bins", "train_min_snr": "per spectral pixel",
         "tail_fraction": "fraction of the release"}


def reference() -> list[tuple[str, str, str, str, str, str]]:
    """Every job-file key, for the docs: (section, key, type, default, unit, description).

    Read from the pydantic models that validate job files, so the reference cannot drift
    from what :func:`load_job` accepts.
    """
    rows = []
    for section, info in _JobFile.model_fields.items():
        model = info.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        for key, f in model.model_fields.items():
            required = f.is_required()
            kind = str(f.annotation).replace("typing.", "").replace("<class '", "").replace(
                "'>", "")
            rows.append((section, key, kind, "required" if required else repr(f.default),
                         UNITS.get(key, ""), f.description or ""))
    return rows


def _validated(path: Path) -> _JobFile:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read job file ({exc})") from exc
    try:
        return _JobFile.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = err["loc"]
            section = f"[{where[0]}]" if where else "the file"
            key = ".".join(str(x) for x in where[1:])
            if err["type"] == "extra_forbidden":
                allowed = sorted(_allowed(str(where[0])) if len(where) > 1 else
                                 _JobFile.model_fields)
                what = (f"unknown key(s) [{key!r}] in {section}; allowed {allowed}" if key else
                        f"unknown section(s) [{str(where[0])!r}]; allowed {allowed}")
            elif err["type"] == "missing":
                what = (f"{section} needs {key!r}" if key else f"needs a {section} section")
            else:
                what = f"{section} {key}: {err['msg'].lower()} (got {err.get('input')!r})"
            problems.append(what)
        raise ConfigError(f"{path}: " + "; ".join(problems)) from None


def _allowed(section: str) -> list[str]:
    model = _JobFile.model_fields.get(section)
    if model is None or model.annotation is None:
        return []
    return list(getattr(model.annotation, "model_fields", {}))


def load_job(path: str | Path) -> IngestJob:
    """Read and validate an ingest job file (see ``ingest/dr15.toml``).

    Raises
    ------
    ConfigError
        Unreadable TOML, unknown sections or keys, missing keys, or wrong types or ranges;
        the one-line message names the file, section and key.
    """
    return load_refresh_job(path)[0]


def load_refresh_job(path: str | Path) -> tuple[IngestJob, RefreshOptions]:
    """Read and validate a refresh job file: an ingest job plus ``[refresh]``.

    See ``ingest/dr17_refresh.toml``.
    """
    path = Path(path)
    spec = _validated(path)

    def resolve(value: str | None) -> str | None:
        if value is None:
            return None
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (path.parent / p))

    job = IngestJob(
        release=spec.job.release,
        cubes=str(resolve(spec.job.cubes)),
        drpall=str(resolve(spec.job.drpall)),
        truth=resolve(spec.job.truth),
        workers=spec.run.workers,
        cubes_per_task=spec.run.cubes_per_task,
        scheduler=spec.run.scheduler,
        config=IngestConfig(**spec.binning.model_dump(), **spec.quality.model_dump()),
        reuse=spec.run.reuse,
    )
    opts = RefreshOptions(**spec.refresh.model_dump())
    return job, opts
