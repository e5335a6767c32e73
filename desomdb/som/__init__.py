"""The DESOM: the network, inference, checkpoints, the model registry and nearest-neighbour indexes.

Layer 5 of the package (see ``docs/architecture.md``).
"""
