"""The pipeline stages that write the archive: ingest, labels, calibration, training, assignment.

Also node labels, fingerprints, indexes, refresh, and cluster runs.

Layer 7 of the package (see ``docs/architecture.md``).
"""
