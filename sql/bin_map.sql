-- bin_map: spaxel -> baxel map (0-based x along RA, y along Dec).
-- Reads exactly the committed Parquet files (desomdb sets the variable files_bin_map from the
-- archive manifest; setup.sql does the same for the DuckDB CLI). Columns: sql/schema.yml.
with source as (
    select * from read_parquet(getvariable('files_bin_map'), hive_partitioning = true, union_by_name = getvariable('union_bin_map'))
),

final as (
    select * from source
)

select * from final
