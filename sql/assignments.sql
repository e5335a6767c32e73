-- assignments: best-matching node of every baxel per model.
-- Reads exactly the committed Parquet files (desomdb sets the variable files_assignments from the
-- archive manifest; setup.sql does the same for the DuckDB CLI). Columns: sql/schema.yml.
with source as (
    select * from read_parquet(getvariable('files_assignments'), hive_partitioning = true, union_by_name = getvariable('union_assignments'))
),

final as (
    select * from source
)

select * from final
