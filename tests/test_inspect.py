"""`isa4d data inspect`: the corruptions training used to meet undetected are caught before training. A truncated
mp4 whose moov is in front fails the header check; a bit-flipped frame needs `--decode`."""

from __future__ import annotations

import json

import webdataset as wds

from isa4d.data.inspect import main


def test_decode_finds_what_the_header_check_cannot(tmp_path, good_samples, defective_samples):
    bad = {s["__key__"]: s for _, s in defective_samples if s["__key__"] in ("bad_bitflip", "bad_truncated")}
    url = str(tmp_path / "shard-000000.tar")
    with wds.TarWriter(url) as sink:
        for s in [*good_samples[:2], *bad.values()]:
            sink.write(s)

    def problems(*flags):
        report = tmp_path / "report.json"
        rc = main([url, *flags, "--json", str(report)])
        return rc, {p["key"]: (p["reason"], p["message"]) for p in json.loads(report.read_text())["problems"]}

    rc, found = problems()
    assert rc == 1 and set(found) == {"bad_truncated"}
    assert found["bad_truncated"][0] == "undecodable" and "truncated" in found["bad_truncated"][1]
    rc, found = problems("--decode")
    assert rc == 1 and set(found) == {"bad_truncated", "bad_bitflip"}
    assert found["bad_bitflip"][0] == "undecodable" and "corrupt frame" in found["bad_bitflip"][1]
