"""paths.py owns every on-disk name: builders and their inverse parsers."""

import re
from pathlib import Path

import desomdb
from desomdb.archive import paths


def test_builders_and_parsers_round_trip() -> None:
    name = paths.cube_part_name("8485-1901", "abcdef0123456789")
    assert paths.parse_part_name(name) == ("8485-1901", "abcdef012345")
    assert paths.parse_part_name(paths.label_part_name("8485-1901", "ppxf-miuscat-v1")) == \
        ("8485-1901", "ppxf-miuscat-v1")
    assert paths.parse_part_name(paths.compact_name(7)) is None
    for gen in (None, 12):
        assert paths.parse_label_part_name(
            paths.label_part_name("8485-1901", "fast-miuscat-v2", gen)) == \
            ("8485-1901", "fast-miuscat-v2")
        part = paths.parse_part_name(paths.label_part_name("8485-1901", "f", gen))
        assert part is not None and part[0] == "8485-1901"
        assert paths.parse_label_errors_name(paths.label_errors_name("fast-miuscat-v2", gen)) \
            == "fast-miuscat-v2"
    assert paths.label_part_name("8485-1901", "f", 3) != paths.label_part_name("8485-1901", "f")
    assert paths.parse_label_errors_name(paths.compact_name(7)) is None
    rel = paths.release_file("baxels", "DR17", name)
    assert paths.parse_partition(rel) == ("baxels", "release", "DR17")
    assert paths.parse_partition(paths.model_file("nodes", "desom1-x")) == \
        ("nodes", "model_id", "desom1-x")
    assert paths.parse_assignment_part_name(paths.assignment_part_name("DR15", name)) == \
        ("DR15", name)
    assert paths.parse_checkpoint_name(paths.checkpoint_name("desom1-ab12", "f" * 64)) == \
        ("desom1-ab12", "f" * 16)


#: String pieces that compose or parse an archive file name.
_NAMING = re.compile(r"""["'](?:part-|compact-|release=|model_id=|_manifest|_current_model|"""
                     r"""train_state|comparison-|truth-)|\{[^{}]*\}\.(?:parquet|pt)\b""")


def test_no_file_name_is_built_or_parsed_outside_paths() -> None:
    root = Path(desomdb.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "paths.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if _NAMING.search(code) and not code.lstrip().startswith(('"""', ">>>")):
                offenders.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
