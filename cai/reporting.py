"""What the stages' report sections share: PNG plots (matplotlib, Agg backend), number formatting, reads.

A stage's section is `report_section(run, metrics) -> list[str]` in the stage's module (markdown lines; each
plot is written to <run>/plots/<name>.png and its line links it); cai.report puts the sections in table order.
"""

from __future__ import annotations

from .rundir import RunDir, load_rows


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(run: RunDir, name: str, draw, title: str, xlabel: str, ylabel: str) -> str:
    """Draw `draw(ax)` to plots/<name>.png and return the markdown line that shows it."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=110)
    draw(ax)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = run.root / "plots" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return f"![{title}](plots/{name}.png)"


def format_value(value, digits=3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def clip(text: str, limit: int = 300) -> str:
    """One line of at most `limit` characters (whitespace collapsed), for quoting model text."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + " …"


def stage_rows(run: RunDir, stage: str) -> list[dict]:
    """A finished stage's dataset; [] if the stage has not finished."""
    return load_rows(run.dataset_path(stage)) if run.is_done(stage) else []


def done_info(run: RunDir, stage: str) -> dict:
    """The stage's DONE record (rows, seconds, resumed, ranks); {} if it has not finished."""
    return run.done_info(stage)
