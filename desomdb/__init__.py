"""desomdb: an archive of integral-field galaxy spectra organised by a Deep Embedded SOM.

The pipeline follows Teimoorinia et al. (2022, ApJ 926, 92): MaNGA DRP cubes are
Voronoi-binned into "baxels", labelled with pPXF, mapped onto a DESOM, and summarised per
galaxy as fingerprints that a second DESOM groups. See ``README.md`` for the commands.
"""

from desomdb._version import __version__
from desomdb.errors import DesomdbError

__all__ = ["DesomdbError", "__version__"]
