-- latest_cubes: the current version of every cube — per plateifu, the newest release in
-- which it was ingested with status ok. Earlier releases stay queryable in every table;
-- join with this view to use each cube once (as node co-adds, node_labels, fingerprints
-- and training do). Releases order by the ordinal recorded when their cubes were ingested
-- (cubes.release_ordinal: DR15 = 15 < DR17 = 17), never by name ('DR9' > 'DR17').
-- Rows written before ordinals were recorded have none (read through to_json, which gives
-- null for an absent column): they order after recorded ones, by name.
with ranked as (
    select
        release,
        plateifu,
        row_number() over (
            partition by plateifu
            order by cast(to_json(c) ->> 'release_ordinal' as integer) desc nulls last,
                release desc
        ) as version_rank
    from cubes as c
    where status = 'ok'
),

final as (
    select release, plateifu from ranked where version_rank = 1
)

select * from final
