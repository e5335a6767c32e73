-- images: the DRP broad-band images of each cube (g, r, i, z), on its spaxel grid.
-- Reads exactly the committed Parquet files (desomdb sets the variable files_images from the
-- archive manifest; setup.sql does the same for the DuckDB CLI). Columns: sql/schema.yml.
with source as (
    select * from read_parquet(getvariable('files_images'), hive_partitioning = true, union_by_name = getvariable('union_images'))
),

final as (
    select * from source
)

select * from final
