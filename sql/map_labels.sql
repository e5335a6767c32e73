-- map_labels: each assigned baxel's labels from its nearest fitted neighbours in latent space.
-- Reads exactly the committed Parquet files (desomdb sets the variable files_map_labels from the
-- archive manifest; setup.sql does the same for the DuckDB CLI). Columns: sql/schema.yml.
with source as (
    select * from read_parquet(getvariable('files_map_labels'), hive_partitioning = true, union_by_name = getvariable('union_map_labels'))
),

final as (
    select * from source
)

select * from final
