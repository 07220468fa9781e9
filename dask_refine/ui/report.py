"""``dask-refine report DIR``: one self-contained HTML page for a job's output folder.

The page (``DIR/report.html``) shows the job's key figures from ``summary.json`` (resolution,
B-factor, sharpening, local resolution, iterations, particles, time), its figures
(``fsc.png``, ``guinier.png``, ``orientations.png``, ``slices.png``, ``local_resolution.png``) embedded as base64 so the file can be mailed on its own,
``iterations.csv`` as a table (refinement), one section per class folder ``class_NNN/``
(heterogeneous jobs), the resolved ``config.json`` and relative links to the output files.
Only the standard library: ``html`` for escaping, no template engine.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import os
import re
from pathlib import Path

from ..io.errors import InputError
from ..io.output_folder import OutputFolder
from ..jobs.checkpoint import ITERATIONS

FIGURES = (("fsc.png", "Fourier shell correlation"), ("guinier.png", "Guinier plot and B-factor"),
           ("orientations.png", "Viewing directions"), ("slices.png", "Central slices"),
           ("local_resolution.png", "Local resolution (half-map FSC in sliding windows)"))
OUTPUT_SUFFIXES = (".mrc", ".csv", ".star", ".json", ".png")
PAGE_INPUTS = (".json", ".csv", ".png")  # what the page reads (maps and stacks are only linked)
CLASS_FOLDER = re.compile(r"class_[0-9]{3}")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } .sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td.k, th.k { text-align: left; }
.figs { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 1em; }
figure { margin: 0; } figure.wide { grid-column: 1 / -1; }
figure img { width: 100%; border: 1px solid #ddd; } .scroll { overflow-x: auto; }
figcaption { color: #555; font-size: 0.9em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _number(value, fmt: str, unit: str = "") -> str:
    if value is None:
        return "–"
    try:
        return f"{format(float(value), fmt)}{unit}"
    except (TypeError, ValueError):
        return str(value)


def _duration(seconds) -> str:
    if seconds is None:
        return "–"
    minutes, s = divmod(float(seconds), 60)
    return f"{s:.1f} s" if minutes < 1 else f"{int(minutes)} min {s:.0f} s"


def _key_figures(summary: dict) -> list[tuple[str, str]]:
    """(label, value) rows of the job's headline numbers."""
    rows = [("job", summary.get("job", "?")),
            ("resolution (FSC 0.143)", _number(summary.get("resolution_A"), ".2f", " Å")),
            ("B-factor (Guinier fit, RELION sign)", _number(summary.get("bfactor_A2"), ".0f",
                                                            " Å²"))]
    if summary.get("sharpening_bfactor_A2") is not None:
        rows.append(("map_sharp.mrc sharpened by", _number(summary["sharpening_bfactor_A2"],
                                                          ".0f", " Å²")))
    local = summary.get("local_resolution_A")
    if local:
        rows.append(("local resolution (median, 5–95%)",
                     f"{local['median']:.2f} Å ({local['p5']:.2f}–{local['p95']:.2f} Å)"))
    if "iterations" in summary:
        converged = "converged" if summary.get("converged") else "iteration limit"
        rows.append(("iterations", f"{summary['iterations']} ({converged})"))
    rows += [("particles", _number(summary.get("n_particles"), ",.0f")),
             ("box", f"{summary.get('box_size', '?')} px at "
                     f"{_number(summary.get('pixel_size_A'), '.3f', ' Å/px')}"),
             ("symmetry", summary.get("symmetry", "C1")),
             ("time", _duration(summary.get("time_s")))]
    if summary.get("mask"):
        rows.insert(3, ("mask", summary["mask"]))
    return rows


def _table(header: list[str] | None, rows: list[list], key_columns: int = 1) -> str:
    """An HTML table (escaped); the first ``key_columns`` columns are left-aligned labels."""
    def cell(tag, i, v):
        cls = ' class="k"' if i < key_columns else ""
        return f"<{tag}{cls}>{_e(v)}</{tag}>"

    head = ("<tr>" + "".join(cell("th", i, h) for i, h in enumerate(header)) + "</tr>"
            if header else "")
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>"
                   for r in rows)
    return f"<table>{head}{body}</table>"


def _figures(folder: Path, prefix: str = "") -> str:
    """The folder's PNG figures as embedded images with captions ('' when none exist)."""
    items = []
    for name, caption in FIGURES:
        path = folder / name
        if path.is_file():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            wide = ' class="wide"' if name in ("slices.png", "local_resolution.png") else ""
            items.append(f'<figure{wide}><img src="data:image/png;base64,{data}" alt="{_e(name)}">'
                         f"<figcaption>{_e(caption)} ({_e(prefix + name)})</figcaption></figure>")
    return f'<div class="figs">{"".join(items)}</div>' if items else ""


def _csv_table(path: Path, digits: int = 4) -> str:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return ""

    def fmt(v: str) -> str:
        try:
            f = float(v)
        except ValueError:
            return v
        if f.is_integer() and "." not in v:
            return str(int(f))
        return f"{f:,.0f}" if abs(f) >= 10 ** digits else f"{f:.{digits}g}"

    table = _table(rows[0], [[fmt(v) for v in r] for r in rows[1:]])
    return f'<div class="scroll">{table}</div>'


def _class_summaries(summary: dict) -> dict[int, dict]:
    """Per-class entries of a heterogeneous job's summary (reconstruct or refine), by class."""
    per_class = summary.get("per_class") or summary.get("classes") or {}
    return {int(k): v for k, v in per_class.items()} if isinstance(per_class, dict) else {}


def _classes(job_dir: Path, summary: dict) -> str:
    folders = sorted(p for p in job_dir.glob("class_[0-9][0-9][0-9]") if p.is_dir())
    if not folders:
        return ""
    info = _class_summaries(summary)
    rows, sections = [], []
    for folder in folders:
        k = int(folder.name.split("_")[1])
        c = info.get(k, {})
        n = c.get("n_particles", sum(c.get("n_particles_per_half", [])) or None)
        rows.append([f"class {k}", _number(n, ",.0f"), _number(c.get("resolution_A"), ".2f", " Å"),
                     _number(c.get("bfactor_A2"), ".0f", " Å²")])
        figures = _figures(folder, f"{folder.name}/")
        sections.append(f"<h3>Class {k}</h3>" + (figures or "<p>no maps (empty class)</p>"))
    table = _table(["class", "particles", "resolution", "B-factor"], rows)
    return "<h2>Classes</h2>" + table + "".join(sections)


def _listing(job_dir: Path) -> dict[str, int]:
    """Sizes of the files in a local job folder (its class folders too; ``iterations/`` as one
    entry of size 0), by relative path."""
    files = {}
    for folder in [job_dir, *sorted(job_dir.glob("class_[0-9][0-9][0-9]"))]:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                files[path.relative_to(job_dir).as_posix()] = path.stat().st_size
    if (job_dir / ITERATIONS).is_dir():
        files[f"{ITERATIONS}/"] = 0
    return files


def _is_output(rel: str) -> bool:
    """An output file the page links to: the job folder's and its class folders' MRC, CSV,
    STAR, JSON and PNG files (not the page itself, hidden files or checkpoints)."""
    parts = rel.split("/")
    return (Path(rel).suffix in OUTPUT_SUFFIXES and not parts[-1].startswith(".")
            and rel != "report.html"
            and (len(parts) == 1 or (len(parts) == 2 and CLASS_FOLDER.fullmatch(parts[0]))))


def _output_links(files: dict[str, int]) -> str:
    """Relative links to the output files (``files``: size in bytes by relative path)."""
    items = []
    for rel, size in files.items():
        if _is_output(rel):
            size = f"{size / 1e6:.2f} MB" if size > 1e5 else f"{size / 1e3:.1f} kB"
            items.append(f'<li><a href="{_e(rel)}">{_e(rel)}</a> ({size})</li>')
    if f"{ITERATIONS}/" in files:
        items.append('<li><a href="iterations/">iterations/</a> (per-iteration checkpoints)</li>')
    return "<h2>Output files</h2><ul>" + "".join(items) + "</ul>"


def read_summary(job_dir) -> dict:
    """The job's ``summary.json``; :class:`InputError` when ``job_dir`` is not a job folder."""
    path = Path(job_dir) / "summary.json"
    if not Path(job_dir).is_dir():
        raise InputError(job_dir, "not a folder; expected a job's output folder")
    if not path.is_file():
        raise InputError(job_dir, "no summary.json; expected the output folder of a finished "
                         "reconstruct/refine job")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON ({exc})") from None


def build_report(job_dir, location: str | None = None,
                 files: dict[str, int] | None = None) -> str:
    """The HTML page for a job folder (a string; see :func:`write_report`). ``location``: the
    folder's name on the page (default: its absolute path); ``files``: the outputs to link, size
    by relative path (default: what is in ``job_dir``)."""
    job_dir = Path(job_dir)
    summary = read_summary(job_dir)
    location = location or str(job_dir.resolve())
    title = f"dask-refine {summary.get('job', 'job')}: {location.rstrip('/').split('/')[-1]}"
    parts = [f"<h1>{_e(title)}</h1><p class='sub'>{_e(location)}</p>",
             "<h2>Key figures</h2>",
             _table(None, _key_figures(summary), key_columns=2),
             _figures(job_dir)]
    if (job_dir / "iterations.csv").is_file():
        parts.append("<h2>Iterations</h2>" + _csv_table(job_dir / "iterations.csv"))
    parts.append(_classes(job_dir, summary))
    if (job_dir / "config.json").is_file():
        parts.append("<details><summary>config.json</summary><pre>"
                     + _e((job_dir / "config.json").read_text()) + "</pre></details>")
    parts.append(_output_links(_listing(job_dir) if files is None else files))
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")


def write_report(job_dir) -> str:
    """Write ``job_dir/report.html`` atomically; returns its path (or URL).

    ``job_dir`` may be an object-store URL: the page's inputs (JSON, CSV and PNG files, not the
    maps) are downloaded to a staging folder, and the page is uploaded beside them."""
    with OutputFolder(job_dir) as folder:
        files = None
        if folder.is_remote:
            remote = folder.published(exclude=(ITERATIONS,))
            if "summary.json" not in remote:
                raise InputError(folder.location, "no summary.json; expected the output "
                                 "folder of a finished reconstruct/refine job")
            folder.fetch(r for r in remote if Path(r).suffix in PAGE_INPUTS)
            files = dict(remote)
            if folder.remote_files(f"{ITERATIONS}/iter_*/state.json"):
                files[f"{ITERATIONS}/"] = 0
            for rel in remote:  # class folders, as the page finds them
                if "/" in rel:
                    (folder.local / rel).parent.mkdir(parents=True, exist_ok=True)
        page = build_report(folder.local, folder.location if folder.is_remote else None, files)
        path = folder.local / "report.html"
        tmp = path.with_name(f".report.html.tmp{os.getpid()}")
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, path)
        folder.publish("report.html")
        return folder.name(path)
