"""Where a command may write: never inside an archive, never over a file it was not asked to.

Every output option of the CLI (``sql --output``, ``maps --out``, ``stack --out``, ``plot
--out``, ``predict --output``, ``report --out``, ``export-hats OUT``, ``demo --out``,
``mock OUT``) goes through :func:`output_file` or :func:`output_folder`:

- a path inside an archive (a folder holding ``_manifest.json`` or ``_manifest.d``, or any
  of its subfolders) is refused, whatever the options: an output there could replace a
  committed file or the manifest;
- an existing file is replaced only with ``--overwrite``;
- ``--overwrite`` on a folder replaces only a folder the command itself wrote (a HATS
  catalogue, a report) and never an archive or a folder holding other files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from desomdb.archive import paths
from desomdb.errors import ConfigError


def enclosing_archive(path: str | Path) -> Path | None:
    """Return the archive folder ``path`` is in (or is), or None.

    Symbolic links are followed, so a link into an archive counts as inside it.
    """
    p = Path(path).expanduser().resolve()
    for candidate in (p, *p.parents):
        if (candidate / paths.MANIFEST).is_file() or (candidate / paths.MANIFEST_DIR).is_dir():
            return candidate
    return None


def refuse_inside_archive(path: str | Path) -> None:
    """Raise :class:`ConfigError` if ``path`` is, or is inside, an archive."""
    root = enclosing_archive(path)
    if root is not None:
        raise ConfigError(f"{path}: inside the archive {root}; write outputs outside the "
                          "archive (there they could replace committed files)")


def output_file(path: str | Path, overwrite: bool = False) -> Path:
    """Check a file output path; return it.

    Raises
    ------
    ConfigError
        If it is inside an archive, is a folder, or exists and ``overwrite`` is False.
    """
    p = Path(path).expanduser()
    refuse_inside_archive(p)
    if p.is_dir():
        raise ConfigError(f"{path} is a folder; name the file to write")
    if p.exists() and not overwrite:
        raise ConfigError(f"{path} exists; pass --overwrite to replace it, or choose "
                          "another name")
    return p


def output_folder(path: str | Path, overwrite: bool = False,
                  wrote_it: Callable[[Path], bool] | None = None) -> Path:
    """Check a folder output path; return it.

    Parameters
    ----------
    path : str or Path
    overwrite : bool
        Replace what the command wrote there before.
    wrote_it : callable, optional
        Whether an existing folder holds only what this command writes (say, a HATS
        catalogue); without it, an existing non-empty folder is never replaced.

    Raises
    ------
    ConfigError
        If it is (or is inside) an archive, is a file, or is a non-empty folder that
        ``overwrite`` may not replace.
    """
    p = Path(path).expanduser()
    refuse_inside_archive(p)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{path} is a file; name a folder")
    if p.is_dir() and any(p.iterdir()):
        if not overwrite:
            raise ConfigError(f"{path} exists and is not empty; pass --overwrite to replace "
                              "it, or choose another folder")
        if wrote_it is None or not wrote_it(p):
            raise ConfigError(f"{path} holds files this command did not write; --overwrite "
                              "replaces only its own output: choose another folder")
    return p
