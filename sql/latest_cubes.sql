-- latest_cubes: the current version of every cube — per plateifu, the newest release in
-- which it was ingested with status ok. Earlier releases stay queryable in every table;
-- join with this view to use each cube once (as node co-adds, node_labels, fingerprints
-- and training do). Releases order by name (DR15 < DR17).
with ranked as (
    select
        release,
        plateifu,
        row_number() over (partition by plateifu order by release desc) as version_rank
    from cubes
    where status = 'ok'
),

final as (
    select release, plateifu from ranked where version_rank = 1
)

select * from final
