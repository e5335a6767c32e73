-- galaxy_outliers: galaxies ranked per DESOM-1 model by the latent distance of their
-- fingerprint to its DESOM-2 node (fingerprints.desom2_distance), farthest first: the
-- galaxies the DESOM-2 groups worst. Beside it, how the galaxy's own baxels sit on the
-- DESOM-1 map (current version of each cube): the median of distance / the model's p99 and
-- the fraction beyond the p99 (its rows in poorly_represented).
with fingerprinted as (
    select model_id, mangaid, desom2_model_id, desom2_node, desom2_distance, n_baxels
    from fingerprints
),

current_versions as (
    select release, plateifu from latest_cubes
),

cube_galaxies as (
    select release, plateifu, mangaid from cubes
),

assigned as (
    select model_id, release, plateifu, distance from assignments
),

thresholds as (
    select model_id, distance_p99 from model_thresholds
),

per_galaxy as (
    select
        a.model_id,
        g.mangaid,
        median(a.distance / t.distance_p99) as median_distance_ratio,
        avg(case when a.distance > t.distance_p99 then 1.0 else 0.0 end) as frac_beyond_p99
    from assigned as a
    inner join current_versions using (release, plateifu)
    inner join cube_galaxies as g using (release, plateifu)
    inner join thresholds as t using (model_id)
    group by a.model_id, g.mangaid
),

final as (
    select
        f.model_id,
        row_number() over (
            partition by f.model_id order by f.desom2_distance desc nulls last, f.mangaid
        ) as outlier_rank,
        f.mangaid,
        f.desom2_model_id,
        f.desom2_node,
        f.desom2_distance,
        f.n_baxels,
        p.median_distance_ratio,
        p.frac_beyond_p99
    from fingerprinted as f
    left join per_galaxy as p using (model_id, mangaid)
)

select * from final order by model_id, outlier_rank
