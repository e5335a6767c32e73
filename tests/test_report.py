import re

import matplotlib.image as mpimg
import numpy as np
from click.testing import CliRunner

from desomdb.cli import main


def test_report_builds_with_non_blank_figures(full_archive, tmp_path) -> None:
    arch, _, _, _ = full_archive
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", str(arch), "--out", str(out)])
    assert result.exit_code == 0, result.output
    index = out / "index.html"
    page = index.read_text()
    refs = re.findall(r'src="([^"]+)"', page)
    assert len(refs) == 4
    for ref in refs:
        img = mpimg.imread(out / ref)
        assert img.shape[0] > 200 and img.shape[1] > 200
        assert float(np.std(img[..., :3])) > 0.02, f"{ref} looks blank"
    assert {p.name for p in out.iterdir()} == {*refs, "index.html"}
