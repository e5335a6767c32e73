"""The archive on disk: file names, the manifest and commit protocol, writer-session hooks.

Layer 2 of the package (see ``docs/architecture.md``): knows nothing of spectra, models or SQL.
"""
