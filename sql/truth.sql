-- truth: mock surveys only: true labels per baxel.
-- Reads exactly the committed Parquet files (desomdb sets the variable files_truth from the
-- archive manifest; setup.sql does the same for the DuckDB CLI). Columns: sql/schema.yml.
-- Light-weighted truths (log_age_lw, mh_lw) read as null in mocks written before them.
with source as (
    select * from read_parquet(getvariable('files_truth'), hive_partitioning = true, union_by_name = getvariable('union_truth'))
    union all by name
    select null::double as log_age_lw, null::double as mh_lw
    where false
),

final as (
    select * from source
)

select * from final
