-- node_partials: per cube and node, the partial sums that the node co-adds add up
-- (n_members, sum_w, sum_wx; nodes.coadd = sum(sum_wx) / sum(sum_w) over latest_cubes).
-- Reads exactly the committed Parquet files (desomdb sets the variable files_node_partials from
-- the archive manifest; setup.sql does the same for the DuckDB CLI). Columns: sql/schema.yml.
with source as (
    select * from read_parquet(getvariable('files_node_partials'), hive_partitioning = true, union_by_name = getvariable('union_node_partials'))
),

final as (
    select * from source
)

select * from final
