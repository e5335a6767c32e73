-- baxel_labels: every baxel with its pPXF labels and its node under the current model
-- (current_model(); change it with desomdb.query.views.use_model or 'desomdb model use').
with all_baxels as (
    select * from baxels
),

fitted as (
    select * exclude (fitter) from preferred_labels
),

current_assignments as (
    select release, plateifu, bin_id, node, row, col, distance, is_adjacent
    from assignments
    where model_id = current_model()
),

final as (
    select
        b.*,
        a.node, a.row, a.col, a.distance, a.is_adjacent,
        l.* exclude (release, plateifu, bin_id)
    from all_baxels as b
    left join fitted as l using (release, plateifu, bin_id)
    left join current_assignments as a using (release, plateifu, bin_id)
)

select * from final
