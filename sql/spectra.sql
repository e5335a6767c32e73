-- spectra: rest-frame flux, ivar, mask per baxel (float32[4544], not normalised).
-- Reads exactly the committed Parquet files (desomdb sets the variable files_spectra from the
-- archive manifest; setup.sql does the same for the DuckDB CLI). Columns: sql/schema.yml.
with source as (
    select * from read_parquet(getvariable('files_spectra'), hive_partitioning = true, union_by_name = getvariable('union_spectra'))
),

final as (
    select * from source
)

select * from final
