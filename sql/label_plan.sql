-- label_plan: the baxels a labelling plan chose to fit, per model (desomdb label --plan).
-- Reads exactly the committed Parquet files (desomdb sets the variable files_label_plan from the
-- archive manifest; setup.sql does the same for the DuckDB CLI). Columns: sql/schema.yml.
with source as (
    select * from read_parquet(getvariable('files_label_plan'), hive_partitioning = true, union_by_name = getvariable('union_label_plan'))
),

final as (
    select * from source
)

select * from final
