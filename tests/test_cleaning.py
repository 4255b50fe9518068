"""Every dirty-data case, generated, with the exact decision `prepare` must take for it."""
import io
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from stages import duplicates, prepare, presets
from stages.config import UserError
from tests.conftest import ROOT, make_image


def photo(path, seed, size=(96, 80), fmt=None, **save):
    """A smooth random picture (low-frequency blobs): distinct per seed, stable under re-encoding."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 255, (5, 6, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    px = np.clip(np.asarray(low, dtype=np.int16) + rng.integers(-6, 6, (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(px.astype(np.uint8)).save(path, fmt, **save)
    return path


def png_bomb(path, side=30000):
    """A valid PNG header announcing side x side pixels, with almost no data: tiny file, huge decode."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * (side + 1))) + chunk(b"IEND", b""))


@pytest.fixture
def dirty(tmp_path):
    """A train/val ImageFolder holding one file for every case, plus enough clean photos around them."""
    src = tmp_path / "dirty"
    for split, n in (("train", 6), ("val", 3)):
        for k, c in enumerate(("fire ant", "abeille dorée")):
            for i in range(n):
                photo(src / split / c / f"clean{i}.jpg", seed=1000 * k + 100 * (split == "val") + i)
    t = src / "train" / "fire ant"
    (t / "empty.jpg").write_bytes(b"")
    (t / "notes.jpg").write_text("this is text, not a JPEG")
    photo(t / "cut.jpg", 9001, size=(200, 160)).write_bytes((t / "cut.jpg").read_bytes()[:900])
    with Image.open(photo(tmp_path / "a.png", 9010, fmt="PNG")) as im:
        im.convert("CMYK").save(t / "cmyk.jpg")
    with Image.open(photo(tmp_path / "b.png", 9011, fmt="PNG")) as im:
        grey = np.asarray(im.convert("L"), dtype=np.uint16)
    Image.fromarray(grey * 257).save(t / "grey16.png")              # 16-bit: 8-bit values x 257
    with Image.open(photo(tmp_path / "c.png", 9012, fmt="PNG")) as im:
        idx = (np.asarray(im.convert("L")) // 2 + 1).astype(np.uint8)  # palette indices 1..128
    idx[:5, :5] = 0                                                  # index 0 is transparent
    pal = Image.fromarray(idx, "P")
    pal.putpalette([v for i in range(256) for v in (i, 2 * i % 256, 255 - i)])
    pal.save(t / "palette.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6                                   # orientation: rotate 90 degrees clockwise
    photo(t / "rotated.jpg", 9002, size=(90, 60), exif=exif.tobytes())
    png_bomb(t / "bomb.png")
    photo(t / "tiny.jpg", 9003, size=(20, 16))
    photo(t / "mislabelled.jpg", 9004, fmt="PNG")          # PNG data behind a .jpg name
    Image.new("RGB", (120, 90), (255, 255, 255)).save(t / "blank.gif")
    photo(t / "copy.jpg", 0)                            # exact copy of train/fire ant/clean0.jpg
    photo(t / "leak.jpg", 100)                          # exact copy of val/fire ant/clean0.jpg
    photo(t / "recompressed.jpg", 1, quality=60)               # near copy (re-encoded) of clean1.jpg
    photo(src / "train" / "abeille dorée" / "twin.jpg", 9005, size=(96, 80), quality=90)  # conflict with...
    photo(t / "twin.jpg", 9005, size=(96, 80), quality=90)                                # ...this one
    (src / "train" / "solo").mkdir()
    photo(src / "train" / "solo" / "only.jpg", 9007)       # a class with one train image...
    photo(src / "val" / "solo" / "only.jpg", 9008)         # ...and one val image
    return src


def decisions(rows):
    return {r["path"].split("dirty/", 1)[1]: r for r in rows}


def test_every_case_gets_its_exact_decision(tmp_path, dirty):
    rows = decisions(prepare.run(dirty, tmp_path / "out", prepare.Params(source=str(dirty))))
    t = "train/fire ant/"
    expect = {  # file: (status, rule, start of the reason)
        "empty.jpg": ("dropped", "unreadable", "zero-byte file"),
        "notes.jpg": ("dropped", "unreadable", "not an image"),
        "cut.jpg": ("dropped", "unreadable", "truncated or damaged"),
        "bomb.png": ("dropped", "bomb", "decompression bomb, refused from its header"),
        "tiny.jpg": ("dropped", "too_small", "20x16 px, under prepare.min_side 32"),
        "blank.gif": ("dropped", "placeholder", "converted from P to RGB; near-uniform image"),
        "copy.jpg": ("dropped", "duplicate", "exact duplicate of "),
        "leak.jpg": ("dropped", "leakage", "same picture as val file "),
        "recompressed.jpg": ("dropped", "near_duplicate", "near duplicate of "),
        "twin.jpg": ("dropped", "conflict", "same picture under labels abeille dorée and fire ant"),
        "cmyk.jpg": ("ok", "", "converted from CMYK to RGB"),
        "grey16.png": ("ok", "", "converted from I;16 to RGB"),
        "palette.png": ("ok", "", "converted from P to RGB"),
        "rotated.jpg": ("ok", "", "EXIF orientation applied"),
        "mislabelled.jpg": ("ok", "format_mismatch", "extension .jpg but PNG data"),
    }
    for name, (status, rule, reason) in expect.items():
        r = rows[t + name]
        assert (r["status"], r["rule"]) == (status, rule), (name, r)
        assert r["reason"].startswith(reason), (name, r["reason"])
    assert rows["train/abeille dorée/twin.jpg"]["rule"] == "conflict"
    assert rows[t + "rotated.jpg"]["width"] == 60 and rows[t + "rotated.jpg"]["height"] == 90
    assert rows["train/solo/only.jpg"]["split"] == "train" and rows["val/solo/only.jpg"]["split"] == "val"
    assert rows[t + "clean0.jpg"]["status"] == rows["val/fire ant/clean0.jpg"]["status"] == "ok"
    assert all(r["split"] == "none" and not r["cached"] for r in rows.values() if r["status"] == "dropped")
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"| `{(dirty / t / 'bomb.png').as_posix()}` | bomb |" in report
    assert "## Set aside (11)" in report                               # the ten above and the other twin


def test_conversions_are_one_consistent_rgb(dirty):
    t = dirty / "train" / "fire ant"
    with Image.open(t / "grey16.png") as im:
        assert im.mode == "I;16"
        v = im.getpixel((10, 10)) // 257
    assert presets.load_rgb(t / "grey16.png").getpixel((10, 10)) == (v, v, v)       # 16 bits onto 8
    assert presets.load_rgb(t / "palette.png").getpixel((0, 0)) == (255, 255, 255)  # transparent on white
    assert presets.load_rgb(t / "palette.png").getpixel((20, 20)) != (255, 255, 255)
    assert presets.load_rgb(t / "cmyk.jpg").mode == "RGB"
    assert presets.load_rgb(t / "rotated.jpg").size == (60, 90)


def test_cached_copies_are_what_training_reads(tmp_path, dirty):
    rows = prepare.run(dirty, tmp_path / "out", prepare.Params(source=str(dirty), cache_side=40))
    kept = [r for r in rows if r["status"] == "ok"]
    assert all(r["cached"].startswith(str(tmp_path / "out" / "images")) for r in kept)
    with Image.open(next(r["cached"] for r in kept if r["path"].endswith("clean0.jpg"))) as im:
        assert min(im.size) == 40 and im.mode == "RGB"


def test_the_shipped_placeholder_is_caught():
    row, _ = prepare.inspect(ROOT / "data/hymenoptera/train/ants/imageNotFound.gif", prepare.Params(source=""))
    assert row["rule"] == "placeholder" and "luminance entropy 0.56" in row["reason"]


def test_rules_can_keep_or_fail(tmp_path, dirty):
    keep = prepare.Params(source=str(dirty), rules={"duplicate": "keep", "near_duplicate": "keep"})
    rows = decisions(prepare.run(dirty, tmp_path / "a", keep))
    assert rows["train/fire ant/copy.jpg"]["status"] == "ok"
    assert rows["train/fire ant/copy.jpg"]["reason"].startswith("exact duplicate of")
    with pytest.raises(UserError, match=r"1 file\(s\) break a rule set to 'fail'.*bomb.png: bomb"):
        prepare.run(dirty, tmp_path / "b", prepare.Params(source=str(dirty), rules={"bomb": "fail"}))
    assert not (tmp_path / "b").exists()                              # nothing half written
    with pytest.raises(UserError, match="prepare.rules.unreadable: 'keep' is not one of drop, fail"):
        prepare.Params(source="x", rules={"unreadable": "keep"})
    with pytest.raises(UserError, match="unknown rule 'duplicates'"):
        prepare.Params(source="x", rules={"duplicates": "drop"})


def photo_like(rng, size=(160, 120)):
    """Smooth colour fields, a few sharp shapes and grain: a stand-in for a photo."""
    im = Image.fromarray(rng.integers(0, 255, (4, 5, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(rng.integers(3, 7)):
        x, y, r = rng.integers(0, size[0]), rng.integers(0, size[1]), rng.integers(size[0] // 12, size[0] // 4)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x - r, y - r // 2, x + r, y + r // 2], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    px = np.asarray(im.filter(ImageFilter.GaussianBlur(1)), dtype=np.int16) + rng.integers(-8, 8, (*size[::-1], 3))
    return Image.fromarray(np.clip(px, 0, 255).astype(np.uint8))


def plain_scenes(rng, n, side=100):
    """`n` different photos of one white wall in one light: each has two small objects or texture patches
    (10-20 % of the side) in its own pair of cells of a 5 x 5 grid, so no two differ only by a light crop."""
    wall = np.array([245.0, 245, 240]) - 10 * (np.arange(side) / side)[:, None, None]     # soft gradient
    cells = [(a, b) for a in range(25) for b in range(a + 1, 25)]
    out = []
    for k in rng.permutation(len(cells))[:n]:
        im = Image.fromarray(np.clip(wall + rng.normal(0, 2, (side, side, 3)), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for cell in cells[k]:
            s = int(rng.integers(side // 10, side // 5))
            x, y = (cell % 5) * side // 5 + (side // 5 - s) // 2, (cell // 5) * side // 5 + (side // 5 - s) // 2
            colour, kind = tuple(int(v) for v in rng.integers(0, 200, 3)), rng.integers(3)
            if kind == 0:
                draw.ellipse([x, y, x + s, y + s], fill=colour)
            elif kind == 1:
                draw.rectangle([x, y, x + s, y + s // 2], fill=colour)
            else:
                im.paste(Image.fromarray(rng.integers(0, 255, (s, s, 3), dtype=np.uint8)), (x, y))
        out.append(im)
    return out


def near_copy(im, rng, kind):
    """The same picture re-encoded (JPEG 60-95), resized (0.5-1.5x), lightly cropped (up to 10 % of its area, cut
    from random edges), or all three."""
    if kind in ("crop", "all"):
        fx = rng.uniform(0, 0.1)
        fy = rng.uniform(0, 1 - 0.9 / (1 - fx))                  # (1 - fx)(1 - fy) >= 0.9 of the area kept
        lx, ty = rng.uniform(0, fx), rng.uniform(0, fy)
        w, h = im.size
        im = im.crop((round(lx * w), round(ty * h), round(w - (fx - lx) * w), round(h - (fy - ty) * h)))
    if kind in ("resize", "all"):
        s = rng.uniform(0.5, 1.5)
        im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=int(rng.integers(60, 96)))
    return Image.open(buf)


def test_near_duplicates_are_confirmed_and_plain_scenes_are_not(tmp_path):
    """Tuning data for prepare.near_max_difference (16): the same photo re-encoded, resized, cropped must be caught
    (>= 95 %), different photos of one white wall (pHash joins many of them) must all be kept."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    kinds = ("jpeg", "resize", "crop", "all")
    for i in range(40):
        d = src / ("photos a", "photos b")[i % 2]
        d.mkdir(parents=True, exist_ok=True)
        im = photo_like(rng)
        im.save(d / f"{i:02d}.png")
        near_copy(im, rng, kinds[i % 4]).save(d / f"{i:02d}-{kinds[i % 4]}.jpg")
    for i, im in enumerate(plain_scenes(rng, 80)):     # two labels: a false match would be a "conflict"
        d = src / ("wall a", "wall b")[i % 2]
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"{i:02d}.png")
    rows = prepare.run(src, tmp_path / "out", prepare.Params(source=str(src)))
    rows = {r["path"].split("src/", 1)[1]: r for r in rows}
    pairs = [[rows[f"{('photos a', 'photos b')[i % 2]}/{i:02d}{end}"] for end in (".png", f"-{kinds[i % 4]}.jpg")]
             for i in range(40)]
    caught = sum(sorted(r["status"] for r in pair) == ["dropped", "ok"] for pair in pairs)
    assert caught >= 38, f"{caught} of 40 near copies caught"          # >= 95 %
    assert all(r["rule"] == "near_duplicate" for pair in pairs for r in pair if r["status"] == "dropped")
    walls = [r for k, r in rows.items() if k.startswith("wall")]
    assert all(r["status"] == "ok" for r in walls), [(r["path"], r["reason"]) for r in walls if r["rule"]]
    report = (tmp_path / "out" / "report.md").read_text()
    similar = int(re.search(r"## Similar, not confirmed \((\d+)\)", report).group(1))
    assert similar >= 5                                 # the trap is real: pHash did join walls
    shown = re.findall(r"!\[pair\]\((pairs/[^)]+)\)", report)
    assert len(shown) == caught + min(similar, prepare.MAX_SIMILAR)
    assert all((tmp_path / "out" / s).is_file() for s in shown)


def test_difference_separates_copies_from_other_pictures():
    rng = np.random.default_rng(1)
    a = photo_like(rng)
    same = [duplicates.difference(*(np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BOX))
                                    for im in (a, near_copy(a, rng, kind)))) for kind in ("jpeg", "crop", "all")]
    other = duplicates.difference(*(np.asarray(im.resize((64, 64), Image.Resampling.BOX))
                                    for im in plain_scenes(rng, 2)))
    assert max(same) < 16 < other, (same, other)
