-- galaxy_fingerprint: one row per galaxy (mangaid) and occupied node of the current model:
-- how many of the galaxy's baxels fall on that node — each plateifu in its newest release
-- (latest_cubes), summed over the galaxy's plateifus. The fingerprints table (and DESOM-2)
-- are built from this view.
with galaxy_baxels as (
    select b.release, b.plateifu, b.bin_id, b.mangaid, b.radius_re
    from baxels as b
    inner join latest_cubes as l using (release, plateifu)
),

current_assignments as (
    select release, plateifu, bin_id, node, row, col
    from assignments
    where model_id = current_model()
),

assigned as (
    select b.mangaid, b.plateifu, b.radius_re, a.node, a.row, a.col
    from galaxy_baxels as b
    inner join current_assignments as a using (release, plateifu, bin_id)
),

galaxy_cubes as (
    select mangaid, count(distinct plateifu) as n_cubes from assigned group by mangaid
),

final as (
    select
        s.mangaid,
        s.node,
        any_value(s.row) as row,
        any_value(s.col) as col,
        count(*) as n_baxels,
        count(*) / sum(count(*)) over (partition by s.mangaid) as fraction,
        median(s.radius_re) as median_radius_re,
        sum(if(isfinite(s.radius_re), s.radius_re, 0)) as sum_radius_re,
        any_value(g.n_cubes) as n_cubes
    from assigned as s
    inner join galaxy_cubes as g using (mangaid)
    group by s.mangaid, s.node
)

select * from final
