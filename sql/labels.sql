-- labels: pPXF labels per baxel.
-- Reads exactly the committed Parquet files (desomdb sets the variable files_labels from the
-- archive manifest; setup.sql does the same for the DuckDB CLI). Columns: sql/schema.yml.
with source as (
    select * from read_parquet(getvariable('files_labels'), hive_partitioning = true, union_by_name = getvariable('union_labels'))
),

final as (
    select * from source
)

select * from final
