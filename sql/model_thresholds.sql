-- model_thresholds: per DESOM-1 model, the latent distance beyond which a baxel counts as
-- poorly represented — the 99th percentile of its training spectra's distances to their best
-- node (models.metrics distance_p99). Used by drift and poorly_represented.
with desom1_models as (
    select model_id, metrics from models where kind = 'desom1'
),

final as (
    select model_id, cast(metrics ->> '$.distance_p99' as double) as distance_p99
    from desom1_models
)

select * from final
