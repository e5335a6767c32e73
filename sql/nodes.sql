-- nodes: SOM nodes per model: prototype, decoded and co-added spectra, member counts (all,
-- and beyond the model's p99 latent distance).
-- Reads exactly the committed Parquet files (desomdb sets the variable files_nodes from the
-- archive manifest; setup.sql does the same for the DuckDB CLI). Columns: sql/schema.yml.
with source as (
    select * from read_parquet(getvariable('files_nodes'), hive_partitioning = true, union_by_name = getvariable('union_nodes'))
),

final as (
    select * from source
)

select * from final
