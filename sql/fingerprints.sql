-- fingerprints: per-galaxy histograms over DESOM-1 nodes and DESOM-2 node.
-- Reads exactly the committed Parquet files (desomdb sets the variable files_fingerprints from the
-- archive manifest; setup.sql does the same for the DuckDB CLI). Columns: sql/schema.yml.
with source as (
    select * from read_parquet(getvariable('files_fingerprints'), hive_partitioning = true, union_by_name = getvariable('union_fingerprints'))
),

final as (
    select * from source
)

select * from final
