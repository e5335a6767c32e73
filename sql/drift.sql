-- drift: per DESOM-1 model and release, how many baxels the model represents poorly
-- (distance to the best node above the training p99; rows in poorly_represented).
-- frac_beyond_p99 near 0.01 is expected; well above it says: retrain on the new data
-- ('desomdb refresh ARCHIVE ... --retrain').
with thresholds as (
    select model_id, cast(metrics ->> '$.distance_p99' as double) as distance_p99
    from models
    where kind = 'desom1'
),

final as (
    select
        a.model_id,
        a.release,
        count(*) as n_baxels,
        count(*) filter (where a.distance > t.distance_p99) as n_beyond_p99,
        count(*) filter (where a.distance > t.distance_p99) / count(*) as frac_beyond_p99,
        any_value(t.distance_p99) as distance_p99
    from assignments as a
    inner join thresholds as t using (model_id)
    group by a.model_id, a.release
)

select * from final order by model_id, release
