-- preferred_labels: the labels of each baxel, one row per baxel (what every derived view,
-- stack, map and export reads). Where more than one fitter labelled a baxel (labels has them
-- all) the row kept is a successful fit before a failed one, then by fitter: the reference (ppxf-*),
-- then batch-*, then fast-*, then any other; the newest version of a fitter first
-- (desomdb.science.fitsetup.FITTER_PREFERENCE). With one fitter in the archive (the
-- variable labels_one_fitter, set from the file names) no ranking is done at all.
with all_fits as (
    select * from labels
),

final as (
    select * from all_fits
    qualify getvariable('labels_one_fitter') or row_number() over (
        partition by release, plateifu, bin_id
        order by status = 'ok' desc, case split_part(fitter, '-', 1) when 'ppxf' then 0 when 'batch' then 1 when 'fast' then 2 else 3 end, fitter desc
    ) = 1
)

select * from final
