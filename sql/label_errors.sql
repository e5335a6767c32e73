-- label_errors: the error model of the label fits (desomdb calibrate), per release, fitter, label and S/N bin.
-- Reads exactly the committed Parquet files (desomdb sets the variable files_label_errors from the
-- archive manifest; setup.sql does the same for the DuckDB CLI). Columns: sql/schema.yml.
with source as (
    select * from read_parquet(getvariable('files_label_errors'), hive_partitioning = true, union_by_name = getvariable('union_label_errors'))
),

final as (
    select * from source
)

select * from final
