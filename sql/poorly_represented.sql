-- poorly_represented: baxels a DESOM-1 model represents poorly — latent distance to the
-- best-matching node above the 99th percentile of the distances of its training spectra
-- (models.metrics distance_p99, from up to 20,000 of them). ~1 % of spectra like the
-- training set land here; many more (see the drift view) mean the data moved: retrain.
with thresholds as (
    select model_id, distance_p99 from model_thresholds
),

final as (
    select a.model_id, a.release, a.plateifu, a.bin_id, a.node, a.distance, t.distance_p99
    from assignments as a
    inner join thresholds as t using (model_id)
    where a.distance > t.distance_p99
)

select * from final
