-- baxels: one row per Voronoi bin: position, S/N, normalisation, quality flags.
-- Reads exactly the committed Parquet files (desomdb sets the variable files_baxels from the
-- archive manifest; setup.sql does the same for the DuckDB CLI). Columns: sql/schema.yml.
with source as (
    select * from read_parquet(getvariable('files_baxels'), hive_partitioning = true, union_by_name = getvariable('union_baxels'))
),

final as (
    select * from source
)

select * from final
