-- cone(ra_deg, dec_deg, radius_arcsec): galaxies rows (every release) within radius_arcsec of
-- (ra_deg, dec_deg), nearest first, with sep_arcsec. Great-circle distance by the haversine
-- formula (accurate at arcsecond separations, where the law of cosines loses digits); the
-- declination band prefilter is exact because a cone never reaches beyond it.
-- Example: select plateifu, sep_arcsec from cone(150.1, 2.2, 60)
create or replace macro cone(ra_deg, dec_deg, radius_arcsec) as table
with band as (
    select * from galaxies
    where dec between dec_deg - radius_arcsec / 3600.0 and dec_deg + radius_arcsec / 3600.0
),

measured as (
    select
        *,
        7200.0 * degrees(asin(sqrt(least(1.0,
            sin(radians(dec - dec_deg) / 2) ** 2
            + cos(radians(dec)) * cos(radians(dec_deg)) * sin(radians(ra - ra_deg) / 2) ** 2
        )))) as sep_arcsec
    from band
),

final as (
    select * from measured where sep_arcsec <= radius_arcsec
)

select * from final order by sep_arcsec
