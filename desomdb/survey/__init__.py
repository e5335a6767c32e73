"""The survey adapter: MaNGA formats, wavelength grid, LSF and mask bits, and the DRP cube reader.

Layer 3 of the package (see ``docs/architecture.md``): everything instrument-specific lives here.
"""
