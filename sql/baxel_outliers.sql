-- baxel_outliers: every baxel of the current version of each cube (latest_cubes), ranked per
-- DESOM-1 model by its latent distance to its best-matching node, farthest first: the
-- spectra a map represents worst. poorly_represented is the part of this ranking beyond the
-- training p99 (beyond_p99); distance_ratio = distance / distance_p99 compares models.
with current_versions as (
    select release, plateifu from latest_cubes
),

assigned as (
    select model_id, release, plateifu, bin_id, node, distance from assignments
),

thresholds as (
    select model_id, distance_p99 from model_thresholds
),

final as (
    select
        a.model_id,
        row_number() over (
            partition by a.model_id order by a.distance desc, a.release, a.plateifu, a.bin_id
        ) as outlier_rank,
        a.release,
        a.plateifu,
        a.bin_id,
        a.node,
        a.distance,
        t.distance_p99,
        a.distance / t.distance_p99 as distance_ratio,
        a.distance > t.distance_p99 as beyond_p99
    from assigned as a
    inner join current_versions using (release, plateifu)
    left join thresholds as t using (model_id)
)

select * from final order by model_id, outlier_rank
