-- galaxy_fingerprint: one row per galaxy (mangaid) and occupied node of the current model:
-- how many of the galaxy's baxels (all its cubes summed) fall on that node.
with galaxy_baxels as (
    select release, plateifu, bin_id, mangaid, radius_re from baxels
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
