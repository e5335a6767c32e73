-- drift: per DESOM-1 model and release, how many baxels the model represents poorly
-- (distance to the best node above the training p99; rows in poorly_represented).
-- For baxels like the training set (the default filter: trainable) frac_trainable_beyond_p99
-- near 0.01 is expected; well above it says: retrain on the new data ('desomdb refresh
-- ARCHIVE ... --retrain'). Low-S/N baxels (not trainable) lie farther from every node.
with thresholds as (
    select model_id, distance_p99 from model_thresholds
),

final as (
    select
        a.model_id,
        a.release,
        count(*) as n_baxels,
        count(*) filter (where a.distance > t.distance_p99) as n_beyond_p99,
        count(*) filter (where a.distance > t.distance_p99) / count(*) as frac_beyond_p99,
        count(*) filter (where b.trainable) as n_trainable,
        count(*) filter (where b.trainable and a.distance > t.distance_p99)
            as n_trainable_beyond_p99,
        count(*) filter (where b.trainable and a.distance > t.distance_p99)
            / nullif(count(*) filter (where b.trainable), 0) as frac_trainable_beyond_p99,
        any_value(t.distance_p99) as distance_p99
    from assignments as a
    inner join thresholds as t using (model_id)
    inner join baxels as b using (release, plateifu, bin_id)
    group by a.model_id, a.release
)

select * from final order by model_id, release
