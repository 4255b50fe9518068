"""prepare's per-file work: what one file is (read, decode, checks, pHash, a small cached RGB copy), remembered
by content between runs, and the same function over many files in process, on every core or on a Ray cluster.

Workers return small rows (never pixels) and write their copies themselves; results come back in input order,
so the manifest does not depend on how many workers made it. The remembered results (`cache`) are keyed by the
file's SHA-256, its extension and every param the inspection reads: a re-run decodes only new or changed files.
"""
import collections
import hashlib
import io
import json
import os
import uuid
import warnings
from pathlib import Path

import imagehash
import PIL
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from stages import presets

EXT_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".bmp": "BMP",
               ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}
TYPES = {"bytes": int, "sha256": str, "width": int, "height": int, "mode": str, "format": str, "phash": str,
         "rule": str, "reason": str}                  # the fields one inspection gives, and their types
KEYED = ("max_pixels", "min_side", "min_entropy", "cache_side")   # every Params field `_decode`/`save_copy` read
VERSION = f"1 Pillow {PIL.__version__} imagehash {imagehash.__version__}"   # a new decoder may decide otherwise
CHUNK = 16          # files per task: ~1 s of work at 1600x1200, so a task's overhead (~1 ms) is noise
WINDOW = 4          # tasks in flight per worker: every worker stays busy, with no future per file
BAD_NAME = "file name is not valid UTF-8 (shown with \\x escapes): rename it"


def safe_name(path):
    """(the path as text the manifest can hold, whether its name was valid UTF-8): bad bytes shown as \\xNN."""
    text = path.as_posix()
    try:
        text.encode("utf-8")
        return text, True
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace"), False


def _read(path):
    """The row of a file's size and content hash; rule 'unreadable' when it cannot be read or is empty."""
    row = {"bytes": 0, "sha256": "", "width": 0, "height": 0, "mode": "", "format": "", "phash": "",
           "rule": "", "reason": ""}
    try:
        with open(path, "rb") as f:
            row.update(bytes=os.fstat(f.fileno()).st_size, sha256=hashlib.file_digest(f, "sha256").hexdigest())
    except OSError as e:                         # no permission, a dangling link, an I/O error
        return {**row, "rule": "unreadable", "reason": f"cannot be read: {e.strerror or e}"}
    if row["bytes"] == 0:
        return {**row, "rule": "unreadable", "reason": "zero-byte file"}
    return row


def inspect(path, p):
    """A manifest row for one file and its RGB image (None when set aside); memory bounded by max_pixels."""
    row = _read(path)
    return (row, None) if row["rule"] else _decode(path, row, p)


def _decode(path, row, p):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)               # reads the header only
    except UnidentifiedImageError:
        return {**row, "rule": "unreadable", "reason": "not an image"}, None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return {**row, "rule": "bomb", "reason": f"decompression bomb, refused from its header: {e}"}, None
    except Exception as e:                       # a header cut short
        return {**row, "rule": "unreadable", "reason": f"truncated or damaged: {e}"}, None
    with im:
        row.update(mode=im.mode, format=im.format or "", width=im.width, height=im.height)
        if im.width * im.height > p.max_pixels:
            return {**row, "rule": "bomb", "reason": f"decompression bomb, refused from its header: {im.width}x"
                                                      f"{im.height} px is over prepare.max_pixels ({p.max_pixels})"}, None
        try:
            rgb = presets.to_rgb(im)             # full decode: truncated files fail here
        except Exception as e:
            return {**row, "rule": "unreadable", "reason": f"truncated or damaged: {e}"}, None
    notes = []
    expected = EXT_FORMATS.get(path.suffix.lower())
    if expected != row["format"]:
        notes.append(("format_mismatch", f"extension {path.suffix or '(none)'} but {row['format']} data"))
    if row["mode"] != "RGB":
        notes.append(("", f"converted from {row['mode']} to RGB"))
    if rgb.size != (row["width"], row["height"]):
        notes.append(("", "EXIF orientation applied"))
    row["width"], row["height"] = rgb.size
    if min(rgb.size) < p.min_side:
        notes.append(("too_small", f"{rgb.width}x{rgb.height} px, under prepare.min_side {p.min_side}"))
    entropy = rgb.convert("L").entropy()
    if entropy < p.min_entropy:
        notes.append(("placeholder", f"near-uniform image: luminance entropy {entropy:.2f} bits "
                                     f"< prepare.min_entropy {p.min_entropy}"))
    row["phash"] = str(imagehash.phash(rgb))
    rules = [r for r, _ in notes if r]
    row["rule"], row["reason"] = (rules[0] if rules else ""), "; ".join(n for _, n in notes)
    return row, rgb


def _put(path, data):
    """Write bytes atomically. Not config.atomic_write: its stale-file sweep lists the folder on every call,
    quadratic over a million files; a per-writer unique name is all that many processes need here."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_copy(rgb, images, sha, side):
    """A decoded RGB copy, shorter side at most `side`, as `images/<sha[:24]>.jpg`: epochs decode this, not the
    full-size original. Returns its bytes (exact copies share one file; encoding is deterministic)."""
    path = images / f"{sha[:24]}.jpg"
    if path.exists():
        return path.read_bytes()
    if side and min(rgb.size) > side:
        scale = side / min(rgb.size)
        rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=95)
    _put(path, buf.getvalue())
    return buf.getvalue()


def cache_key(sha, suffix, p):
    """What an inspection's result depends on: the bytes, the extension (format_mismatch) and the KEYED params."""
    return hashlib.sha256(json.dumps([VERSION, sha, suffix, *(getattr(p, k) for k in KEYED)]).encode()).hexdigest()


def _entry(cache, key):
    return Path(cache) / key[:2] / key


def _summed(key, row, copy):
    return hashlib.sha256(json.dumps([key, row, copy], sort_keys=True).encode()).hexdigest()


def recall(cache, key, images):
    """The remembered row for `key`, its copy restored into `images`; None for a missing, half-written or
    damaged entry (each entry carries a checksum of itself and of its copy: nothing unverified is trusted)."""
    base = _entry(cache, key)
    try:
        meta = json.loads(base.with_suffix(".json").read_bytes())
        row, copy = meta["row"], meta["copy"]
        if (meta["sum"] != _summed(key, row, copy) or set(row) != set(TYPES)
                or not all(type(row[k]) is t for k, t in TYPES.items())):
            return None
        if copy:
            data = base.with_suffix(".jpg").read_bytes()
            if hashlib.sha256(data).hexdigest() != copy:
                return None
            target = images / f"{row['sha256'][:24]}.jpg"
            if not target.exists():                  # exact copies share one
                _put(target, data)
        return row, bool(copy)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def remember(cache, key, row, data):
    """Store a row and its copy's bytes (or None) under `key`: the copy first, the entry that vouches for it last."""
    base = _entry(cache, key)
    base.parent.mkdir(parents=True, exist_ok=True)
    copy = hashlib.sha256(data).hexdigest() if data is not None else ""
    if data is not None:
        _put(base.with_suffix(".jpg"), data)
    _put(base.with_suffix(".json"), json.dumps({"row": row, "copy": copy, "sum": _summed(key, row, copy)}).encode())


def forget_others(cache, keys):
    """Remove every cache file whose key is not in `keys` (last run's leftovers, writes cut short)."""
    cache = Path(cache)
    if not cache.is_dir():
        return
    for sub in cache.iterdir():
        for f in sub.iterdir() if sub.is_dir() else [sub]:
            if f.name.split(".")[0] not in keys:
                f.unlink(missing_ok=True)


def check(path, p, images, cache=None):
    """One file's inspection fields plus `path` (as text), `copy` (its RGB copy is in `images`) and `key` (its
    cache entry, or ''): from `cache` when these bytes were seen with these params, else decoded."""
    text, valid = safe_name(path)
    row = _read(path)
    key = cache_key(row["sha256"], path.suffix, p) if cache and valid and not row["rule"] else ""
    hit = recall(cache, key, images) if key else None
    if hit:
        row, copy = hit
    else:
        row, rgb = (row, None) if row["rule"] else _decode(path, row, p)
        data = save_copy(rgb, images, row["sha256"], p.cache_side) if rgb is not None and valid else None
        if key:
            remember(cache, key, row, data)
        copy = data is not None
    if not valid:
        row.update(rule="bad_name", reason=BAD_NAME)
    return {**row, "path": text, "copy": copy, "key": key}


def check_many(paths, p, images, cache=None):
    return [check(Path(f), p, images, cache) for f in paths]


def check_all(paths, p, images, cache=None, workers=1):
    """check() of every path, in order, with a progress bar: in this process (workers 1), on a pool of `workers`
    processes (0: every core), or as Ray tasks when RAY_ADDRESS names a cluster (0: all of its CPUs). Worker
    processes start by forkserver: a script calling this with workers != 1 needs `if __name__ == "__main__":`."""
    with tqdm(total=len(paths), desc="prepare: checking images", unit="img") as bar:
        if workers == 1 or len(paths) <= CHUNK:            # one task's worth: starting workers costs more
            for path in paths:
                yield check(path, p, images, cache)
                bar.update()
            return
        chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]   # lists of paths: no pixels
        mapped = _on_ray if os.environ.get("RAY_ADDRESS") else _on_pool
        for rows in mapped(chunks, (p, images, cache), workers):
            yield from rows
            bar.update(len(rows))


def _on_pool(chunks, args, workers):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = workers or len(os.sched_getaffinity(0))
    workers = min(workers, max(1, len(chunks)))
    # forkserver, not fork: the parent may hold threads (Ray, tqdm's monitor) whose locks a fork would copy held.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["stages.inspection"])
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        yield from _in_order(lambda c: pool.submit(check_many, c, *args), lambda f: f.result(), chunks,
                             WINDOW * workers)


def _on_ray(chunks, args, workers):
    """Ray tasks over the cluster; the source and the output folder must be on a file system every node sees."""
    from stages.cluster import ray_init

    ray = ray_init()
    task = ray.remote(check_many)
    window = WINDOW * (workers or int(ray.cluster_resources().get("CPU", 1)))
    args = [ray.put(a) for a in args]
    yield from _in_order(lambda c: task.remote(c, *args), ray.get, chunks, window)


def _in_order(submit, result, chunks, window):
    """result(submit(chunk)) for every chunk, in order, at most `window` in flight. By hand because the
    stdlib's ProcessPoolExecutor.map and Pool.imap submit every task up front: a million futures' worth."""
    pending = collections.deque()
    for chunk in chunks:
        pending.append(submit(chunk))
        if len(pending) >= window:
            yield result(pending.popleft())
    while pending:
        yield result(pending.popleft())
