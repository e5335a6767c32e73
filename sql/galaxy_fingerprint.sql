-- galaxy_fingerprint: one row per galaxy (mangaid) and occupied node of the current model:
-- how many of the galaxy's baxels fall on that node — each plateifu in its newest release
-- (latest_cubes), summed over the galaxy's plateifus, as in the fingerprints table.
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

final as (
    select
        b.mangaid,
        a.node,
        any_value(a.row) as row,
        any_value(a.col) as col,
        count(*) as n_baxels,
        count(*) / sum(count(*)) over (partition by b.mangaid) as fraction,
        median(b.radius_re) as median_radius_re
    from galaxy_baxels as b
    join current_assignments as a using (release, plateifu, bin_id)
    group by b.mangaid, a.node
)

select * from final
