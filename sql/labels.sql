-- labels: the fits' labels per baxel, key (release, plateifu, bin_id, fitter). One archive can
-- hold labels of more than one fitter for the same baxel (desomdb label --fitter ppxf on an
-- archive labelled by the default fitter, to compare them); preferred_labels keeps one row
-- per baxel, and every derived view reads that one. Reads exactly the committed Parquet files (desomdb sets the
-- variable files_labels from the archive manifest; setup.sql does the same for the DuckDB
-- CLI). Columns: sql/schema.yml. Columns added later (lsf_source, log_age_lw, mh_lw) read as
-- their "before" value in rows written earlier: those fits used the nominal LSF and stored
-- no light-weighted labels.
with source as (
    select * from read_parquet(getvariable('files_labels'), hive_partitioning = true, union_by_name = getvariable('union_labels'))
    union all by name
    select null::varchar as lsf_source, null::double as log_age_lw, null::double as mh_lw
    where false
),

final as (
    select * replace (coalesce(lsf_source, 'nominal') as lsf_source) from source
)

select * from final
