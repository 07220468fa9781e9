"""Live refinement pages inside the Dask dashboard (docs/design.md §6).

The scheduler's dashboard is a Bokeh server whose pages are the module-level dict
``distributed.dashboard.scheduler.applications``. Importing this module adds two routes there:

- ``/dask-refine``: the whole refinement page (FSC of every iteration, resolution per
  iteration, central slices of the current half maps along three axes, distribution of viewing
  directions, pose and class changes, class sizes, particles/s, pose evaluations per particle
  against an exhaustive search with the candidates pruned by the search's bound apart from those
  dropped by its cap), with the Dask navigation bar (task stream, progress, workers
  one click away);
- ``/individual-dask-refine``: the same, listed in ``/individual-plots.json`` so the JupyterLab
  Dask extension offers it as a pane beside a notebook.

The data are the jobs' progress events (:mod:`dask_refine.parallel.events`), read from the
scheduler's event log once a second: no second server, port or process. Routes must be added
before a scheduler starts:

- embedded cluster: ``register()`` (the CLI's ``--dashboard`` and the notebooks do this) before
  creating the ``LocalCluster``, whose scheduler lives in this process;
- remote scheduler: ``dask scheduler --preload dask_refine.ui.dashboard``.
"""

from __future__ import annotations

import numpy as np

from ..parallel.events import TOPIC

ROUTE = "/dask-refine"
INDIVIDUAL_ROUTE = "/individual-dask-refine"
NAV_PAGE = ROUTE.strip("/")
UPDATE_INTERVAL_MS = 1000


# --------------------------------------------------------------------------- registration

def register() -> None:
    """Add our pages to the dashboard of every scheduler started after this call (idempotent)."""
    from distributed.dashboard.scheduler import applications

    applications.setdefault(ROUTE, refinement_doc)
    applications.setdefault(INDIVIDUAL_ROUTE, refinement_doc)


def add_navigation_link(dask_scheduler=None) -> bool:
    """Add "Dask-Refine" to the navigation bar of ``dask_scheduler``'s dashboard pages; returns
    whether the scheduler serves our pages. Run it on the scheduler (``client.run_on_scheduler``)
    or as the preload hook."""
    from distributed.dashboard.scheduler import applications, template_variables

    if ROUTE not in applications or dask_scheduler is None:
        return False
    if getattr(dask_scheduler, "http_application", None) is None:
        return False
    pages = template_variables(dask_scheduler)["pages"]
    if NAV_PAGE not in pages:
        pages.append(NAV_PAGE)
    return True


def dask_setup(scheduler) -> None:
    """Preload hook (``dask scheduler --preload dask_refine.ui.dashboard``)."""
    register()
    add_navigation_link(scheduler)


def page_url(client) -> str | None:
    """URL of the refinement page on ``client``'s scheduler, or None when that scheduler does not
    serve it (not preloaded with this module, or no dashboard)."""
    try:
        served = client.run_on_scheduler(add_navigation_link)
    except Exception:  # noqa: BLE001 - e.g. dask_refine not importable on the scheduler
        return None
    link = client.dashboard_link if served else None
    if not link:
        return None
    base = link.rsplit("/", 1)[0] if link.endswith("/status") else link.rstrip("/")
    return base + ROUTE


# --------------------------------------------------------------------------- data → sources

def latest_run(events) -> list[dict]:
    """The payloads of the most recent run among ``events`` (``(timestamp, payload)`` pairs),
    in order, one per iteration (a repeated iteration number keeps the last payload)."""
    payloads = [msg for _, msg in events if isinstance(msg, dict) and "run" in msg]
    if not payloads:
        return []
    run = payloads[-1]["run"]
    by_iteration: dict[int, dict] = {}
    for p in payloads:  # a later payload of an iteration updates it (e.g. the final results)
        if p["run"] == run:
            by_iteration[p["iteration"]] = {**by_iteration.get(p["iteration"], {}), **p}
    return [by_iteration[k] for k in sorted(by_iteration)]


def _class_entry(payload: dict, class_index: int) -> dict | None:
    classes = payload.get("classes", [])
    if class_index < len(classes) and not classes[class_index].get("empty"):
        return classes[class_index]
    return None


def _nan(x):
    return np.nan if x is None else x


def source_data(run: list[dict], class_index: int = 0) -> dict[str, dict]:
    """Column data for every plot of the page from one run's payloads (pure; tested directly)."""
    iterations = [p["iteration"] for p in run]
    colours = _iteration_colours(len(run))
    fsc = {"xs": [], "ys": [], "iteration": [], "color": []}
    for p, colour in zip(run, colours):
        entry = _class_entry(p, class_index)
        if entry is not None:
            fsc["xs"].append(entry["shell_inv_A"])
            fsc["ys"].append(entry["fsc"])
            fsc["iteration"].append(p["iteration"])
            fsc["color"].append(colour)
    n_classes = max((len(p.get("classes", [])) for p in run), default=1)
    resolution = {"xs": [], "ys": [], "label": [], "color": []}
    sizes = {"xs": [], "ys": [], "label": [], "color": []}
    for k in range(n_classes):
        entries = [_class_entry(p, k) for p in run]
        resolution["xs"].append(iterations)
        resolution["ys"].append([np.nan if e is None else _nan(e["resolution_A"])
                                 for e in entries])
        resolution["label"].append(f"class {k + 1}")
        resolution["color"].append(_class_colour(f"class {k + 1}"))
        sizes["xs"].append(iterations)
        sizes["ys"].append([0 if e is None else e.get("n_particles", 0) for e in entries])
        sizes["label"].append(f"class {k + 1}")
        sizes["color"].append(_class_colour(f"class {k + 1}"))
    stats = [p.get("stats", {}) for p in run]
    changes = {"iteration": iterations,
               "pose_change_deg": [_nan(s.get("median_pose_change_deg")) for s in stats],
               "class_change_pct": [100 * _nan(s.get("class_change_fraction")) for s in stats]}
    speed = {"iteration": iterations,
             "particles_per_s": [_nan(s.get("particles_per_s")) for s in stats],
             "evaluations": [_nan(s.get("mean_evaluations")) for s in stats],
             "exhaustive": [_nan(s.get("exhaustive_evaluations")) for s in stats],
             "pruned_by_bound": [_nan(s.get("mean_pruned_by_bound")) for s in stats],
             "pruned_by_cap": [_nan(s.get("mean_pruned_by_cap")) for s in stats]}
    posterior = {"iteration": iterations,
                 "significant_poses": [_nan(s.get("median_significant_poses")) for s in stats],
                 "accuracy_deg": [_nan(s.get("angular_accuracy_deg")) for s in stats],
                 "outlier_pct": [100 * _nan(s.get("outlier_fraction")) for s in stats]}
    out = {"fsc": fsc, "resolution": resolution, "sizes": sizes, "changes": changes,
           "speed": speed, "posterior": posterior, "resolution_points": _points(resolution),
           "sizes_points": _points(sizes)}
    last = run[-1] if run else None
    entry = _class_entry(last, class_index) if last else None
    for half in ("A", "B"):
        for axis, name in enumerate(("xy", "xz", "yz")):
            image = (np.asarray(entry[f"slices_half_{half}"][axis], dtype=np.uint8)
                     if entry else np.zeros((1, 1), np.uint8))
            out[f"slice_{half}_{name}"] = {"image": [image], "dw": [image.shape[1]],
                                          "dh": [image.shape[0]]}
    orient = (last or {}).get("orientations")
    counts = np.asarray(orient["counts"], dtype=float) if orient else np.zeros((1, 1))
    out["orientations"] = {"image": [counts], "max": [float(counts.max()) or 1.0]}
    return out


def _points(lines: dict) -> dict:
    """The vertices of multi-line data, flattened, so single iterations show as markers."""
    xs, ys, labels = [], [], []
    for x, y, label in zip(lines["xs"], lines["ys"], lines["label"]):
        xs += list(x)
        ys += list(y)
        labels += [label] * len(x)
    return {"x": xs, "y": ys, "label": labels, "color": [_class_colour(label) for label in labels]}


def _class_colour(label: str) -> str:
    from bokeh.palettes import Category10_10

    return Category10_10[(int(label.split()[-1]) - 1) % 10]


def _iteration_colours(n: int) -> list[str]:
    from bokeh.palettes import Viridis256

    if n <= 1:
        return [Viridis256[0]] * n
    return [Viridis256[int(round(i * 220 / (n - 1)))] for i in range(n)]


def header_html(run: list[dict]) -> str:
    """Status line: job, output folder, iteration, resolution, throughput; links to Dask pages."""
    links = ('<a href="status">Dask status</a> · <a href="tasks">task stream</a> · '
             '<a href="workers">workers</a> · <a href="graph">graph</a> · '
             '<a href="events">events</a>')
    if not run:
        return (f"<h2>dask-refine</h2><p id='status-line'>waiting for the first iteration of a "
                f"job …</p><p>{links}</p>")
    from html import escape

    last = run[-1]
    res = last.get("resolution_A")
    stats = last.get("stats", {})
    parts = [f"<b>{escape(last['job'])}</b> → <code>{escape(last['out_dir'])}</code>",
             f"iteration {last['iteration']} of at most {last['max_iterations']}",
             f"resolution {res:.2f} Å" if res is not None else "resolution —"]
    if stats.get("particles_per_s") is not None:
        parts.append(f"{stats['particles_per_s']:.0f} particles/s")
    final = last.get("final") or {}
    if final.get("sharpening_bfactor_A2") is not None:
        parts.append(f"done: map_sharp.mrc sharpened by {final['sharpening_bfactor_A2']:.0f} Å²")
    local = final.get("local_resolution_A")
    if local:
        parts.append(f"local resolution {local['median']:.2f} Å "
                     f"(5–95%: {local['p5']:.2f}–{local['p95']:.2f} Å)")
    return (f"<h2>dask-refine: {escape(last['job'])}</h2>"
            f"<p id='status-line'>{' · '.join(parts)}</p><p>{links}</p>")


# --------------------------------------------------------------------------- the page


def _series(fig, source, series) -> None:
    """Lines with points on ``fig``, one per ``(column, colour, legend label, dash)``."""
    for key, colour, label, dash in series:
        fig.line("iteration", key, source=source, line_width=2, color=colour, line_dash=dash,
                 legend_label=label)
        fig.scatter("iteration", key, source=source, size=6, color=colour)


class RefinementPage:
    """The Bokeh models of the page and their update from the scheduler's event log."""

    def __init__(self, scheduler):
        from bokeh.layouts import column, gridplot, row
        from bokeh.models import (ColorBar, ColumnDataSource, Div, LinearColorMapper, Select,
                                  Span)
        from bokeh.palettes import Greys256, Viridis256
        from bokeh.plotting import figure

        self.scheduler = scheduler
        self.n_events = -1
        self.class_index = 0
        empty = source_data([])
        self.sources = {k: ColumnDataSource(v, name=f"{k}_source") for k, v in empty.items()}
        self.header = Div(text=header_html([]), name="header", sizing_mode="stretch_width")
        self.class_select = Select(title="class", value="1", options=["1"], visible=False,
                                   width=120)
        self.class_select.on_change("value", self._on_class)
        tools = "pan,wheel_zoom,box_zoom,reset,save,hover"

        f_fsc = figure(title="FSC (half maps) per iteration", height=300, width=460, tools=tools,
                       x_axis_label="resolution (1/Å)", y_axis_label="FSC", y_range=(-0.1, 1.05),
                       name="fsc_figure", tooltips=[("iteration", "@iteration")])
        f_fsc.multi_line("xs", "ys", color="color", line_width=2, source=self.sources["fsc"])
        f_fsc.add_layout(Span(location=0.143, dimension="width", line_dash="dashed",
                              line_color="firebrick"))

        f_res = figure(title="Resolution (FSC = 0.143)", height=300, width=340, tools=tools,
                       x_axis_label="iteration", y_axis_label="Å", name="resolution_figure",
                       tooltips=[("", "@label")])
        f_res.multi_line("xs", "ys", line_width=2, source=self.sources["resolution"],
                         color="color")
        f_res.scatter("x", "y", color="color", size=7, source=self.sources["resolution_points"])

        f_changes = figure(title="Changes per iteration", height=250, width=340, tools=tools,
                           x_axis_label="iteration", y_axis_label="median pose change (°) / "
                           "class change (%)", name="changes_figure")
        f_changes.line("iteration", "pose_change_deg", source=self.sources["changes"],
                       line_width=2, legend_label="pose change (°)")
        f_changes.scatter("iteration", "pose_change_deg", source=self.sources["changes"], size=6)
        f_changes.line("iteration", "class_change_pct", source=self.sources["changes"],
                       line_width=2, color="darkorange", legend_label="class change (%)")

        f_sizes = figure(title="Particles per class", height=250, width=340, tools=tools,
                         x_axis_label="iteration", y_axis_label="particles", name="sizes_figure",
                         tooltips=[("", "@label")])
        f_sizes.multi_line("xs", "ys", line_width=2, source=self.sources["sizes"],
                           color="color")
        f_sizes.scatter("x", "y", color="color", size=7, source=self.sources["sizes_points"])

        f_speed = figure(title="Throughput", height=250, width=340, tools=tools,
                         x_axis_label="iteration", y_axis_label="particles/s",
                         name="speed_figure")
        f_speed.vbar(x="iteration", top="particles_per_s", width=0.6,
                     source=self.sources["speed"], color="steelblue")

        f_evals = figure(title="Pose evaluations per particle", height=250, width=340,
                         tools=tools, y_axis_type="log", x_axis_label="iteration",
                         y_axis_label="evaluations", name="evaluations_figure")
        _series(f_evals, self.sources["speed"], (
            ("exhaustive", "gray", "exhaustive search", "dashed"),
            ("evaluations", "crimson", "evaluated (mean)", "solid"),
            ("pruned_by_bound", "seagreen", "pruned by the bound", "solid"),
            ("pruned_by_cap", "darkorange", "dropped by the cap", "solid")))
        f_post = figure(title="Posterior per particle", height=250, width=340, tools=tools,
                        y_axis_type="log", x_axis_label="iteration",
                        y_axis_label="poses / ° / %", name="posterior_figure")
        _series(f_post, self.sources["posterior"], (
            ("significant_poses", "seagreen", "significant poses (median)", "solid"),
            ("accuracy_deg", "purple", "angular accuracy (°, median)", "solid"),
            ("outlier_pct", "firebrick", "low-likelihood particles (%)", "solid")))
        for f in (f_changes, f_evals, f_post):
            f.legend.location = "top_right"
            f.legend.label_text_font_size = "8pt"
        f_evals.legend.location = "center_right"  # exhaustive above, the search's counts below

        grey = LinearColorMapper(palette=Greys256, low=0, high=255)  # density white
        slices = []
        for half in ("A", "B"):
            for name, label in (("xy", "XY (z = centre)"), ("xz", "XZ (y = centre)"),
                                ("yz", "YZ (x = centre)")):
                f = figure(title=f"half {half}: {label}", width=190, height=190, tools="",
                           toolbar_location=None, match_aspect=True,
                           name=f"slice_{half}_{name}_figure")
                f.image("image", x=0, y=0, dw="dw", dh="dh", color_mapper=grey,
                        source=self.sources[f"slice_{half}_{name}"])
                f.axis.visible = False
                f.grid.visible = False
                slices.append(f)

        self.orient_mapper = LinearColorMapper(palette=Viridis256, low=0, high=1)
        f_orient = figure(title="Viewing directions (particles per 10° bin)", height=300,
                          width=560, x_range=(-180, 180), y_range=(-90, 90), tools="save,hover",
                          x_axis_label="azimuth, rot (°)", y_axis_label="elevation, 90° − tilt (°)",
                          name="orientation_figure", tooltips=[("particles", "@image")])
        f_orient.image("image", x=-180, y=-90, dw=360, dh=180, color_mapper=self.orient_mapper,
                       source=self.sources["orientations"])
        f_orient.add_layout(ColorBar(color_mapper=self.orient_mapper, width=10), "right")

        self.root = column(
            self.header, self.class_select,
            row(f_fsc, f_res, f_orient),
            row(gridplot(slices, ncols=3, toolbar_location=None),
                column(row(f_changes, f_sizes), row(f_speed, f_evals))),
            row(f_post),
            sizing_mode="fixed")

    def _on_class(self, attr, old, new):
        self.class_index = int(new) - 1
        self.n_events = -1
        self.update()

    def update(self) -> None:
        events = self.scheduler.get_events(TOPIC)
        if len(events) == self.n_events:
            return
        self.n_events = len(events)
        run = latest_run(events)
        n_classes = max((len(p.get("classes", [])) for p in run), default=1)
        self.class_select.options = [str(k + 1) for k in range(n_classes)]
        self.class_select.visible = n_classes > 1
        if self.class_index >= n_classes:
            self.class_index = 0
        data = source_data(run, self.class_index)
        for key, values in data.items():
            self.sources[key].data = values
        self.orient_mapper.high = data["orientations"]["max"][0]
        self.header.text = header_html(run)


def refinement_doc(scheduler, extra, doc) -> None:
    """Bokeh document of ``/dask-refine`` (signature of the dashboard's page functions)."""
    from distributed.dashboard.components import add_periodic_callback
    from distributed.dashboard.components.scheduler import BOKEH_THEME, env

    page = RefinementPage(scheduler)
    page.update()
    add_periodic_callback(doc, page, UPDATE_INTERVAL_MS)
    doc.title = "dask-refine: live refinement"
    doc.add_root(page.root)
    doc.template = env.get_template("simple.html")
    doc.template_variables.update(extra)
    pages = list(doc.template_variables.get("pages", []))
    if NAV_PAGE not in pages:
        doc.template_variables["pages"] = pages + [NAV_PAGE]
    doc.theme = BOKEH_THEME


register()  # importing the module (also as a scheduler preload) adds the pages
