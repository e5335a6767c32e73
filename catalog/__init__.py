"""Package data: the intake catalog describing the archive (metadata only)."""
