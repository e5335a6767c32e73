"""What users take away: predictions, similarity search, stacks, maps, exports, reports.

Also status and checks.

Layer 8 of the package (see ``docs/architecture.md``).
"""
