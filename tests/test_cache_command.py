import time

from trickbag import cache
from trickbag.cli import main


def make_entry(folder, name, size, days_ago):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.npz"
    path.write_bytes(b"x" * size)
    cache.record_use(path, f"/data/{name}", now=time.time() - days_ago * 86400)
    return path


def test_cache_show_and_clear(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRICKBAG_CACHE_DIR", str(tmp_path / "c"))
    assert main(["cache"]) == 0
    assert "(not created yet)" in capsys.readouterr().out
    old = make_entry(tmp_path / "c", "old", 2500, days_ago=10)
    new = make_entry(tmp_path / "c", "new", 100, days_ago=0)
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert f"image cache: {tmp_path / 'c'}\n2 entries, 2.6 KB\n" in out
    assert "  new.npz      100 B  used    0 min ago  /data/new\n" in out
    assert "  old.npz     2.5 KB  used  10 days ago  /data/old\n" in out
    assert main(["cache", "clear", "--older-than", "7"]) == 0
    assert "removed 1 entries unused for more than 7 days" in capsys.readouterr().out
    assert not old.exists() and new.exists()
    assert main(["cache", "--cache-dir", str(tmp_path / "c"), "clear"]) == 0
    assert not new.exists() and cache.list_entries(tmp_path / "c") == []


def test_full_clear_also_forgets_cached_probe_choices(tmp_path):
    from trickbag import cache

    probes = tmp_path / "probes"
    probes.mkdir()
    (probes / "abc.json").write_text("{}")
    assert (probes / "abc.json") in cache.clear(tmp_path)
    assert not (probes / "abc.json").exists()
    (probes / "def.json").write_text("{}")
    cache.clear(tmp_path, older_than_days=1)  # pruning by age keeps the probe choices
    assert (probes / "def.json").exists()
