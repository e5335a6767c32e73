"""Job files: a typed schema per section, validated on load."""

from pathlib import Path

import pytest

import desomdb
from desomdb.errors import ConfigError
from desomdb.pipeline import jobs

BASE = '[job]\nrelease = "DR15"\ncubes = "cubes"\ndrpall = "/abs/drpall.fits"\n'


def _load(tmp_path: Path, text: str):
    path = tmp_path / "job.toml"
    path.write_text(text)
    return jobs.load_refresh_job(path)


def test_paths_resolve_against_the_job_file(tmp_path) -> None:
    job, opts = _load(tmp_path,
                      BASE + "[binning]\ntarget_snr = 15\nwvt = true\n[run]\nworkers = 3\n")
    assert job.cubes == str(tmp_path / "cubes") and job.drpall == "/abs/drpall.fits"
    assert job.config.target_snr == 15.0 and job.workers == 3 and opts.retrain is False
    assert job.config.wvt is True


@pytest.mark.parametrize("extra, message", [
    # Seen: [binning] and [quality] accepted each other's keys.
    ("[binning]\nmin_good_bins = 10\n", r"unknown key\(s\) \['min_good_bins'\] in \[binning\]"),
    ("[quality]\ntarget_snr = 10\n", r"unknown key\(s\) \['target_snr'\] in \[quality\]"),
    ("[binning]\ntarget_snr = 'high'\n", r"\[binning\] target_snr: input should be a valid"),
    ("[binning]\ntarget_snr = -1\n", r"\[binning\] target_snr: input should be greater"),
    ("[run]\nworkers = 0\n", r"\[run\] workers"),
    # Seen: [refresh] was re-parsed untyped.
    ("[refresh]\ndevice = 'gpu'\n", r"\[refresh\] device: input should be 'cpu' or 'cuda'"),
    ("[refresh]\nretrain = 'yes'\n", r"\[refresh\] retrain"),
    ("[refresh]\nlabel_max = 3\n", r"unknown key\(s\) \['label_max'\] in \[refresh\]"),
    ("[extra]\nx = 1\n", r"unknown section\(s\) \['extra'\]"),
])
def test_bad_job_files_name_section_and_key(tmp_path, extra, message) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, BASE + extra)


def test_missing_keys_and_bad_toml(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"\[job\] needs 'drpall'"):
        _load(tmp_path, '[job]\nrelease = "DR15"\ncubes = "x"\n')
    with pytest.raises(ConfigError, match="cannot read job file"):
        _load(tmp_path, "[job\n")


@pytest.mark.parametrize("name", ["dr15.toml", "dr17.toml", "dr17_refresh.toml"])
def test_shipped_job_files_validate(name) -> None:
    folder = Path(desomdb.__file__).parent.parent / "ingest"
    job, opts = jobs.load_refresh_job(folder / name)
    assert job.release in ("DR15", "DR17") and opts.device == "cpu"
