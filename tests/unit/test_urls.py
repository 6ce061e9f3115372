"""URL -> fsspec filesystem happens in one module, ict_scale.urls, whatever reads or writes storage."""
import pathlib
import re

import fsspec.implementations.local
import pytest

from ict_scale.urls import open_url, url_to_fs

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "ict_scale"


def test_local_paths_and_file_urls_reach_the_same_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    for url in (str(tmp_path / "a.bin"), f"file://{tmp_path}/a.bin"):
        fs, path = url_to_fs(url)
        assert isinstance(fs, fsspec.implementations.local.LocalFileSystem)
        assert fs.cat_file(path) == b"abc"
        with open_url(url) as f:
            assert f.read() == b"abc"
    with pytest.raises(FileNotFoundError):
        open_url(str(tmp_path / "missing.bin")).read()


def test_options_reach_the_filesystem():
    fs, _ = url_to_fs("memory://x/y", {"skip_instance_cache": True})
    other, _ = url_to_fs("memory://x/y", {"skip_instance_cache": True})
    assert fs is not other  # the option was honoured: a fresh instance each time


def test_no_other_module_turns_urls_into_filesystems():
    pattern = re.compile(r"fsspec\.(core\.url_to_fs|open|filesystem)\(|get_fs_token_paths")
    found = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
             if p.name != "urls.py" and pattern.search(p.read_text())]
    assert found == [], found
