-- node_summary: one row per node of the current model with its size and the median of
-- each label over its members (from node_labels, after the paper's label cuts).
with model_nodes as (
    select model_id, node, row, col, n_members from nodes where model_id = current_model()
),

model_node_labels as (
    select node, label, median from node_labels where model_id = current_model()
),

medians as (
    select
        node,
        max(median) filter (where label = 'age_mw_gyr') as median_age_mw_gyr,
        max(median) filter (where label = 'mh_mw') as median_mh_mw,
        max(median) filter (where label = 'log_ml_r') as median_log_ml_r,
        max(median) filter (where label = 'ebv_star') as median_ebv_star,
        max(median) filter (where label = 'ebv_gas') as median_ebv_gas,
        max(median) filter (where label = 'log_ssfr') as median_log_ssfr,
        max(median) filter (where label = 'd_bpt') as median_d_bpt
    from model_node_labels
    group by node
),

final as (
    select n.*, m.* exclude (node)
    from model_nodes as n
    left join medians as m using (node)
)

select * from final order by node
