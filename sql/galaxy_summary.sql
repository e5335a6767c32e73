-- galaxy_summary: one row per cube in its newest release (latest_cubes) with the drpall
-- columns, the median labels of its baxels (the paper's label cuts, as node_labels), the
-- galaxy's fingerprint peak node under the current model and its DESOM-2 node. What
-- 'desomdb export-hats' writes; select from it with cone() for a sky region.
with current_galaxies as (
    select g.*
    from galaxies as g
    inner join latest_cubes as l using (release, plateifu)
),

usable_labels as (
    select l.*
    from preferred_labels as l
    inner join latest_cubes as c using (release, plateifu)
    where l.status = 'ok' and l.chi2_ok
),

medians as (
    select
        release,
        plateifu,
        count(*) as n_labelled,
        string_agg(distinct fitter, ',' order by fitter) as fitter,
        median(age_mw_gyr) filter (where not isnan(age_mw_gyr)) as median_age_mw_gyr,
        median(mh_mw) filter (where not isnan(mh_mw)) as median_mh_mw,
        median(log_ml_r) filter (where not isnan(log_ml_r)) as median_log_ml_r,
        median(ebv_star) filter (where not isnan(ebv_star)) as median_ebv_star,
        median(ebv_gas) filter (where ssfr_ok and not isnan(ebv_gas)) as median_ebv_gas,
        median(log_ssfr) filter (where ssfr_ok and not isnan(log_ssfr)) as median_log_ssfr,
        median(d_bpt) filter (where bpt_ok and not isnan(d_bpt)) as median_d_bpt
    from usable_labels
    group by release, plateifu
),

cube_baxels as (
    select release, plateifu, count(*) as n_baxels
    from baxels
    group by release, plateifu
),

current_fingerprints as (
    select
        mangaid,
        model_id,
        n_baxels as n_baxels_galaxy,
        list_position(counts::bigint[], list_max(counts::bigint[])) - 1 as peak_node,
        list_max(counts::bigint[]) / n_baxels as peak_fraction,
        desom2_model_id,
        desom2_node
    from fingerprints
    where model_id = current_model()
),

final as (
    select
        g.*,
        b.n_baxels,
        m.* exclude (release, plateifu),
        f.* exclude (mangaid)
    from current_galaxies as g
    left join cube_baxels as b using (release, plateifu)
    left join medians as m using (release, plateifu)
    left join current_fingerprints as f using (mangaid)
)

select * from final order by plateifu
