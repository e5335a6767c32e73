"""Running jobs: tasks on a serial loop, a process pool or a Dask cluster, and their progress.

Layer 1 of the package (see ``docs/architecture.md``): knows nothing of the archive or the science.
"""
