"""The science, pure: binning, spectra, co-adds, dust, emission lines, geometry, templates, fits.

Layer 4 of the package (see ``docs/architecture.md``): arrays in, arrays out; no archive tables.
"""
