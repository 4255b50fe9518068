"""Same picture or not: perceptual-hash candidates, confirmed by the pixels before anything is set aside.

A pHash match alone joined different photos on plain backgrounds (TRAPS.md), so a candidate pair counts as one
picture only when, after the light crop that best aligns the two, no small window of their 64x64 RGB
thumbnails differs by more than a threshold. Exact copies (same content hash) need no confirmation.
"""
import numpy as np
from PIL import Image

SIDE = 64       # px of the square thumbnails compared (aspect ignored, as pHash ignores it)
WINDOW = 8      # px: the difference is the worst 8x8 window (stride 4) of the mean absolute RGB difference
SLACK = 1       # px: each pixel is compared with the closest of the other's 3x3 around it (resampling)
STEPS = 11      # alignment grid per crop edge over [-crop, +crop], then refined 4x finer around the best


def thumbnail(path):
    """The image at `path` as SIDE x SIDE x 3 uint8 (area-averaged)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BOX))


def _coords(lo, hi, n, s):
    """Bilinear sample positions of s points over [lo, 1 - hi] of an axis of n px: (index, weight), (K, s)."""
    c = np.clip((lo[:, None] + (np.arange(s) + 0.5)[None] / s * (1 - lo - hi)[:, None]) * n - 0.5, 0, n - 1)
    i = np.minimum(np.floor(c).astype(int), n - 2)
    return i, c - i


def _resample_1d(profile, lo, hi):
    """(K, n, 3) samples of a (n, 3) profile cut by lo/hi (fractions) at each end."""
    i, w = _coords(lo, hi, len(profile), len(profile))
    return profile[i] * (1 - w[..., None]) + profile[i + 1] * w[..., None]


def _crop(t, box):
    """The box (left, top, right, bottom cut, as fractions) of thumbnail t, resampled to SIDE x SIDE."""
    (x, fx), (y, fy) = (_coords(np.array([box[a]]), np.array([box[a + 2]]), SIDE, SIDE) for a in (0, 1))
    x, fx, y, fy = x[0], fx[0][None, :, None], y[0], fy[0][:, None, None]
    rows = t[y] * (1 - fy) + t[y + 1] * fy
    return rows[:, x] * (1 - fx) + rows[:, x + 1] * fx


def _align_axis(pa, pb, crop):
    """Cuts (a_lo, a_hi, b_lo, b_hi) of two profiles that match best; a positive edge value cuts a, negative b."""
    step = 2 * crop / (STEPS - 1)
    best = (0.0, 0.0)
    for g in (np.linspace(-crop, crop, STEPS), np.linspace(-step / 2, step / 2, 5)):   # coarse, then fine
        lo, hi = (np.clip(v.ravel() + c, -crop, crop) for v, c in zip(np.meshgrid(g, g, indexing="ij"), best))
        keep = np.abs(lo) + np.abs(hi) <= crop + 1e-9       # one image a crop of the other, not a free shift
        lo, hi = lo[keep], hi[keep]
        cut = [np.maximum(lo, 0), np.maximum(hi, 0), np.maximum(-lo, 0), np.maximum(-hi, 0)]
        err = ((_resample_1d(pa, cut[0], cut[1]) - _resample_1d(pb, cut[2], cut[3])) ** 2).mean((1, 2))
        k = int(err.argmin())
        best = (float(lo[k]), float(hi[k]))
    return [max(best[0], 0), max(best[1], 0), max(-best[0], 0), max(-best[1], 0)]


def difference(a, b, crop=0.1):
    """Levels (0-255): the worst window of |a - b| once one is cut by up to `crop` of a side per axis.

    Crops act on one axis each, so each axis is aligned on its row/column mean profiles, then compared in 2D.
    Measured (tests/test_cleaning.py's generators, 64 px): the same photo re-encoded, resized 0.5-1.5x and
    cropped by up to 10 % of its area differs by at most 9.9 (10.2 for the shipped photos); different photos
    of one white wall, each with its own small objects, by 27.6 or more.
    """
    a, b = a.astype(np.float32), b.astype(np.float32)
    ax = _align_axis(a.mean(0), b.mean(0), crop)           # column profiles: left/right cuts
    ay = _align_axis(a.mean(1), b.mean(1), crop)           # row profiles: top/bottom cuts
    ca, cb = _crop(a, (ax[0], ay[0], ax[1], ay[1])), _crop(b, (ax[2], ay[2], ax[3], ay[3]))
    pb, n = np.pad(cb, ((SLACK, SLACK), (SLACK, SLACK), (0, 0)), mode="edge"), 2 * SLACK + 1
    d = np.min([np.abs(ca - pb[i:i + SIDE, j:j + SIDE]).mean(2) for i in range(n) for j in range(n)], axis=0)
    c = np.pad(d.cumsum(0).cumsum(1), ((1, 0), (1, 0)))   # integral image: every window's sum in one step
    i = np.arange(0, SIDE - WINDOW + 1, WINDOW // 2)
    lo, hi = np.ix_(i, i), np.ix_(i + WINDOW, i + WINDOW)
    sums = c[hi] - c[i[:, None] + WINDOW, i[None]] - c[i[:, None], i[None] + WINDOW] + c[lo]
    return float(sums.max() / WINDOW ** 2)


def candidates(hashes, near_distance):
    """Index pairs (a < b) of 64-bit hashes within `near_distance` bits, in a stable order."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    pairs = []
    for start in range(0, len(hashes), 512):                      # bounded memory: 512 x n at a time
        dist = np.bitwise_count(hashes[start:start + 512, None] ^ hashes[None, :])
        pairs += [(start + int(a), int(b), int(dist[a, b])) for a, b in zip(*np.nonzero(dist <= near_distance))
                  if start + a < b]
    return pairs


def side_by_side(paths, out, height=96):
    """A small PNG of the images at `paths` next to each other (each at most height x height)."""
    ims = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            im.thumbnail((height, height))
            ims.append(im)
    sheet = Image.new("RGB", (sum(im.width for im in ims) + 4 * (len(ims) + 1), height + 8), "white")
    x = 4
    for im in ims:
        sheet.paste(im, (x, 4 + (height - im.height) // 2))
        x += im.width + 4
    sheet.save(out, "PNG", optimize=True)
