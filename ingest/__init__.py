"""Package data: ingest job definitions, one TOML file per data release."""
