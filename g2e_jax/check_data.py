"""``g2e-jax check-data``: every row and every image of the configured source, checked once, before a run.

The same pass starts ``train``, ``mine`` and ``prepare`` (``data.check=False`` skips it). Each row is
parsed and validated (JSON, required fields, types, something to embed on each side); each distinct
image is opened and fully decoded by a thread pool (PIL releases the GIL while decoding). Every bad
row is reported at once with its subset, file, line, field and reason.

Cache: one JSON file per source (``data.check_cache``, default under ``$XDG_CACHE_HOME/g2e_jax``),
one entry per subset, written atomically, every path in it absolute. An entry is reused while its
fingerprint holds: (size, mtime) of every subset file, and the mtime of every folder holding a
referenced image. A second start then costs a few stat calls, where hashing would read every image
again (terabytes for MMEB). Adding, removing or renaming an image changes its folder's mtime; an image
rewritten in place under the same name does not, so ``check-data --force`` re-checks everything (and
``data.bad_rows`` still catches such a row during the run).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from g2e_jax.data.images import ImageError, load_image
from g2e_jax.data.jsonl import InvalidJSON, json_lines
from g2e_jax.data.mmeb import TRAIN_COLUMNS, split_files
from g2e_jax.data.prepared import META_FILE, PreparedDataset
from g2e_jax.distributed import publish, wait_for
from g2e_jax.io import write_atomic

VERSION = 1
_TEXT_IMAGE = (("qry", "qry_image_path"), ("pos_text", "pos_image_path"))


def _source(cfg, source: str | None, split: str | None = None):
    """(kind, folder, subsets, split, image_dir) the command would read."""
    d = cfg.data
    subsets = list(d.get("subsets", ()) or cfg.get("subsets", ()))
    kind = source or d.get("source", "mmeb")
    folder = {
        "mmeb": d.get("root"),
        "clusters": d.get("clusters_dir"),
        "prepared": d.get("prepared_dir"),
    }.get(kind)
    if kind not in ("mmeb", "clusters", "prepared"):
        raise ValueError(f"unknown data.source {kind!r}; expected clusters, mmeb or prepared")
    if folder is None:
        key = {"mmeb": "data.root", "clusters": "data.clusters_dir", "prepared": "data.prepared_dir"}[kind]
        raise ValueError(f"check-data: data.source={kind} needs --config.{key}")
    if not subsets:
        raise ValueError("check-data: no subsets configured (data.subsets)")
    image_dir = d.get("image_dir")
    return (
        kind,
        Path(folder).absolute(),
        subsets,
        split or d.get("split", "original"),
        image_dir and Path(image_dir).absolute(),
    )


# --- reading rows with their provenance --------------------------------------------------------------------


def _records(kind: str, folder: Path, subset: str, split: str):
    """(files, iterator of (file, line, record or error text)) of one subset."""
    if kind == "clusters":
        files = [folder / subset / "original.jsonl"]
    else:
        _, files = split_files(folder / subset, split)
        if not files:
            from g2e_jax.data.mmeb import load_split  # save_to_disk folders (and the 'no split' error)

            ds, where = load_split(folder, subset, split)
            files = sorted(f for f in (folder / subset).rglob("*") if f.is_file())
            return files, ((where, i + 1, r) for i, r in enumerate(ds))
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{missing[0]}: not found" + (" (run `g2e-jax mine` first)" if kind == "clusters" else "")
        )

    def rows():
        for f in files:
            if f.suffix == ".parquet":
                import pyarrow.parquet as pq

                for i, r in enumerate(pq.read_table(f).to_pylist()):
                    yield str(f), i + 1, r
                continue
            for number, record in json_lines(f, errors="replace"):
                yield str(f), number, record.reason if isinstance(record, InvalidJSON) else record

    return files, rows()


def _row_problems(record: dict, image_dir: Path | None):
    """(field, reason) problems of one MMEB row, and the images it needs as (field, path)."""
    problems, images = [], []
    missing = [c for c in TRAIN_COLUMNS if c not in record]
    if missing:
        return [(missing[0], f"missing field(s) {missing}")], []
    for text_key, image_key in _TEXT_IMAGE:
        text, image = record[text_key], record[image_key]
        if text is not None and not isinstance(text, str):
            problems.append((text_key, f"expected text, got {type(text).__name__}"))
        if image not in (None, "") and not isinstance(image, str):
            problems.append((image_key, f"expected a path, got {type(image).__name__}"))
            continue
        if image in (None, ""):
            if (text is None or isinstance(text, str)) and not (text or "").strip():
                problems.append((text_key, "empty text and no image: nothing to embed"))
            continue
        images.append((image_key, image))
    negative = record.get("neg_image_path")  # optional, but the MMEB reader resolves it too
    if isinstance(negative, str) and negative:
        images.append(("neg_image_path", negative))
    elif negative not in (None, ""):
        problems.append(("neg_image_path", f"expected a path, got {type(negative).__name__}"))
    images = [
        (f, str(Path(p) if image_dir is None or Path(p).is_absolute() else image_dir / p)) for f, p in images
    ]
    return problems, images


def _image_problem(path: str) -> str | None:
    try:
        load_image(path, source="image").close()
    except ImageError as e:
        return str(e)
    return None


# --- one subset --------------------------------------------------------------------------------------------


def _check_subset(kind, folder, subset, split, image_dir, pool, progress) -> dict:
    files, records = _records(kind, folder, subset, split)
    bad, needs, rows = [], [], 0  # needs: (file, line, member, field, image path)
    for file, line, record in records:
        rows += 1
        if isinstance(record, str):
            bad.append({"subset": subset, "file": file, "line": line, "field": "<line>", "reason": record})
            continue
        if not isinstance(record, dict):
            bad.append(
                {
                    "subset": subset,
                    "file": file,
                    "line": line,
                    "field": "<line>",
                    "reason": f"expected a JSON object, got {type(record).__name__}",
                }
            )
            continue
        members = [record]
        if kind == "clusters":
            negatives = record.get("neg_samples", [])
            if not isinstance(negatives, list):
                bad.append(
                    {
                        "subset": subset,
                        "file": file,
                        "line": line,
                        "field": "neg_samples",
                        "reason": "expected a list of rows",
                    }
                )
                negatives = []
            members += negatives
        for member, row in enumerate(members):
            where = {
                "subset": subset,
                "file": file,
                "line": line,
                **({"member": member} if kind == "clusters" else {}),
            }
            if not isinstance(row, dict):
                bad.append({**where, "field": "neg_samples", "reason": "expected a JSON object"})
                continue
            problems, images = _row_problems(row, image_dir)
            bad += [{**where, "field": f, "reason": r} for f, r in problems]
            needs += [(where, f, p) for f, p in images]
    paths = sorted({p for _, _, p in needs})
    found = dict(
        zip(
            paths,
            tqdm(
                pool.map(_image_problem, paths),
                total=len(paths),
                disable=not progress,
                desc=f"checking {subset} images",
                unit="image",
            ),
        )
    )
    bad += [{**where, "field": f, "reason": found[p]} for where, f, p in needs if found[p] is not None]
    bad.sort(key=lambda b: (b["file"], b["line"], b.get("member", 0), b["field"]))
    folders = sorted({str(Path(p).parent) for p in paths})
    return {
        "files": [_stat(f) for f in files],
        "dirs": [_stat(d) for d in folders],
        "rows": rows,
        "images": len(paths),
        "bad": bad,
    }


def _check_prepared(folder: Path, subset: str, progress) -> dict:
    from g2e_jax.preprocess import PreparedInputs  # here: the other checks need no JAX

    data = PreparedDataset(folder)
    inputs = PreparedInputs(data)
    if subset not in data.subsets:
        raise ValueError(f"{folder}: no subset {subset!r}; has {data.subsets}")
    bad, count = [], data._subsets[subset]["rows"]
    for row in tqdm(range(count), disable=not progress, desc=f"checking {subset} records", unit="record"):
        index = data.index(subset, row)
        try:
            record = data[index]
            for side in ("qry", "pos"):
                inputs(record, side)
        except Exception as e:  # noqa: BLE001 - any unreadable record is a bad row
            bad.append(
                {
                    "subset": subset,
                    "file": str(folder),
                    "line": index + 1,
                    "field": "<record>",
                    "reason": f"{type(e).__name__}: {e}",
                }
            )
    files = [folder / META_FILE, *sorted(folder.glob("*.array_record*"))]
    return {"files": [_stat(f) for f in files], "dirs": [], "rows": count, "images": 0, "bad": bad}


def _stat(path) -> list:
    st = os.stat(path)
    return [str(Path(path).absolute()), st.st_size, st.st_mtime_ns]


def _still_valid(entry: dict) -> bool:
    try:
        return all(_stat(f[0]) == f for f in entry["files"]) and all(
            _stat(d[0])[2] == d[2] for d in entry["dirs"]
        )
    except OSError:
        return False


# --- the pass ----------------------------------------------------------------------------------------------


def cache_file(cfg, source: str | None = None, split: str | None = None) -> Path:
    kind, folder, _, split, image_dir = _source(cfg, source, split)
    configured = cfg.data.get("check_cache")
    if configured:
        return Path(configured).absolute()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "g2e_jax" / "check-data"
    key = hashlib.sha256(json.dumps([VERSION, kind, str(folder), split, str(image_dir)]).encode()).hexdigest()
    return base / f"{key[:24]}.json"


def check_data(
    cfg, *, source: str | None = None, split: str | None = None, force: bool = False, progress: bool = True
) -> dict:
    """Checks every subset (cached entries reused unless ``force``); returns ``{"subsets": {name:
    {rows, images, bad, cached}}, "bad": [every bad row], "cache": path}``."""
    kind, folder, subsets, split, image_dir = _source(cfg, source, split)
    path = cache_file(cfg, source, split)
    try:
        cache = json.loads(path.read_text())
        cache = cache if cache.get("version") == VERSION else {}
    except (OSError, ValueError):
        cache = {}
    entries = dict(cache.get("subsets", {}))
    workers = int(cfg.data.get("check_workers", 0) or 0) or os.cpu_count() or 1
    report, changed = {}, False
    with ThreadPoolExecutor(workers, thread_name_prefix="check-data") as pool:
        for subset in subsets:
            entry = entries.get(subset)
            cached = not force and entry is not None and _still_valid(entry)
            if not cached:
                entry = (
                    _check_prepared(folder, subset, progress)
                    if kind == "prepared"
                    else _check_subset(kind, folder, subset, split, image_dir, pool, progress)
                )
                entries[subset], changed = entry, True
            report[subset] = {
                "rows": entry["rows"],
                "images": entry["images"],
                "bad": len(entry["bad"]),
                "cached": cached,
            }
    if changed:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            meta = {
                "source": kind,
                "folder": str(folder),
                "split": split,
                "image_dir": image_dir and str(image_dir),
            }
            write_atomic(path, json.dumps({"version": VERSION, **meta, "subsets": entries}, indent=1) + "\n")
        except OSError as e:  # a read-only home must not stop a run; the next start checks again
            print(f"check-data: could not write the cache {path} ({e})", flush=True)
    bad = [b for s in subsets for b in entries[s]["bad"]]
    return {"subsets": report, "bad": bad, "cache": str(path)}


def format_report(result: dict) -> str:
    """Human-readable: one line per subset, then one line per bad row (subset, file:line, field, reason)."""
    lines = []
    for name, s in result["subsets"].items():
        lines.append(
            f"{name}: {s['rows']} rows, {s['images']} images, {s['bad']} bad"
            + (" (cached)" if s["cached"] else "")
        )
    for b in result["bad"]:
        member = f" member {b['member']}" if "member" in b else ""
        lines.append(f"  {b['subset']}  {b['file']}:{b['line']}{member}  {b['field']}: {b['reason']}")
    total = len(result["bad"])
    lines.append(f"{total} bad row{'s' if total != 1 else ''}" if total else "all rows good")
    return "\n".join(lines)


def check_before_run(cfg, command: str, *, source: str | None = None, split: str | None = None) -> None:
    """The check at the start of ``train``/``mine``/``prepare`` (unless ``data.check`` is False).

    Process 0 checks; the others wait for its verdict through the coordination service's key-value
    store (no collective that could time out during a long first check). Bad rows are an error listing
    them all, except for ``train`` with ``data.bad_rows="skip"``, which prints them and skips each row
    when it meets it."""
    import jax

    if not cfg.data.get("check", True):
        return
    skip = command == "train" and cfg.data.get("bad_rows", "error") == "skip"
    if jax.process_index() != 0:
        verdict = _verdict(None)
        if verdict < 0 or (verdict and not skip):
            raise ValueError("process 0's data check failed or found bad rows (see its log); stopping")
        return
    try:
        result = check_data(cfg, source=source, split=split)
    except Exception:
        _verdict(-1)  # the others stop too
        raise
    bad = len(result["bad"])
    _verdict(bad)
    if not bad:
        return
    text = format_report(result)
    if not skip:
        raise ValueError(
            f"{bad} bad row(s) in the data; fix them, set --config.data.bad_rows=skip (train), or "
            f"--config.data.check=False to start anyway:\n{text}"
        )
    print(f"check-data: {text}\n(data.bad_rows=skip: these rows are skipped and recorded in skipped.jsonl)")


def _verdict(value: int | None) -> int:
    """Process 0 publishes the number of bad rows (-1: the check failed); the others read it."""
    import jax

    if jax.process_count() == 1:
        return value or 0
    if value is not None:
        publish("check-data", str(value))
        return value
    return int(wait_for("check-data"))
