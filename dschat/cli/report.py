"""e2e_rlhf.py's <output-dir>/report.html: the summary table, each step's training plots (embedded) and a few
held-out answers side by side (base, SFT, RLHF/DPO), from the step folders' dschat_metrics.json and PNGs alone."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from dschat.cli import e2e
from dschat.runtime.plots import PLOT_FILE

REPORT_FILE = "report.html"
STYLE = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;font-family:monospace}td.ans{max-width:340px;white-space:pre-wrap}
img{max-width:100%;border:1px solid #ddd}h2{margin-top:28px}.muted{color:#777}"""


def _e(value: Any) -> str:
    """HTML-escaped text."""
    return html.escape(str(value))


def step_metrics(step: int, folder: Path, result: dict[str, Any] | None) -> dict[str, Any]:
    """A step's metrics: from summary.json's entry when it holds them, else its dschat_metrics.json."""
    return (result or {}).get("metrics") or e2e.read_metrics(step, folder)


def answer_columns(pipe: e2e.Pipeline, metrics: dict[int, dict[str, Any]]) -> list[tuple[str, dict[str, str]]]:
    """(column, {prompt: answer}) for base (step 1's first evaluation), SFT (step 1's last, else the final step's
    first) and the final model (its last evaluation); columns without answers are left out."""
    def answers(step: int, index: int) -> dict[str, str]:
        evals = [e for e in metrics.get(step, {}).get("evals", []) if isinstance(e, dict)]
        if not evals:
            return {}
        return {str(p): str(a) for p, a in (evals[index].get("answers") or []) if p is not None}

    final = pipe.final
    sft = answers(1, -1) or answers(final, 0)
    cols = [("base model", answers(1, 0)), ("SFT", sft), (pipe.step_names[final], answers(final, -1))]
    return [(name, col) for name, col in cols if col]


def summary_rows(pipe: e2e.Pipeline, results: dict[int, dict[str, Any]],
                 metrics: dict[int, dict[str, Any]]) -> list[str]:
    """The summary table's <tr> rows: each step's status, wall time and start/end metrics."""
    rows = []
    for step in pipe.steps:
        r = results.get(step, {})
        wall = r.get("wall_time_s", metrics.get(step, {}).get("wall_time_s"))
        numbers = e2e.metric_rows(metrics.get(step, {})) or [("(no metrics)", None, None)]
        for i, (name, a, b) in enumerate(numbers):
            head = (f"<td rowspan={len(numbers)}>{step} {_e(e2e.step_name(step, pipe))}<br><span class=muted>"
                    f"{_e(pipe.what_changed[step])}</span></td><td rowspan={len(numbers)}>"
                    f"{_e(e2e.fmt_time(wall) if wall is not None else '-')} {_e(r.get('status', ''))}</td>"
                    if i == 0 else "")
            rows.append(f"<tr>{head}<td>{_e(name)}</td><td class=num>{_e(e2e.fmt_value(a))}</td>"
                        f"<td class=num>{_e(e2e.fmt_value(b))}</td></tr>")
    return rows


def build_report(out: Path, pipe: e2e.Pipeline, dirs: dict[int, Path], summary: dict[str, Any] | None = None,
                 n_answers: int = 3) -> str:
    """The report page's HTML for the steps' output folders `dirs` (plots embedded as PNG data)."""
    summary = summary or {}
    results = {int(k): v for k, v in (summary.get("steps") or {}).items()}
    metrics = {s: step_metrics(s, dirs[s], results.get(s)) for s in pipe.steps if s in dirs}
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>dschat report: {_e(out.name)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>dschat run: {_e(pipe.name)} pipeline</h1>",
             f"<p>Output: <code>{_e(out)}</code>. Status: {_e(summary.get('status', '-'))}. Actor: "
             f"{_e(summary.get('actor_model', '-'))}"
             + (f", reward model: {_e(summary['reward_model'])}" if summary.get("reward_model") else "")
             + (f". Total wall time: {_e(e2e.fmt_time(summary['total_wall_time_s']))}"
                if summary.get("total_wall_time_s") is not None else "") + ".</p>",
             "<h2>Summary</h2><table><tr><th>Step</th><th>Wall time</th><th>Held-out metric</th><th>Start</th>"
             "<th>End</th></tr>", *summary_rows(pipe, results, metrics), "</table>"]
    if summary.get("chat_command"):
        parts.append(f"<p>Chat with the result: <code>{_e(summary['chat_command'])}</code></p>")
    cols = answer_columns(pipe, metrics)
    if cols:
        prompts = list(dict.fromkeys(p for _, col in cols for p in col))[:n_answers]
        parts += ["<h2>Held-out answers</h2><table><tr><th>prompt</th>",
                  *(f"<th>{_e(name)}</th>" for name, _ in cols), "</tr>"]
        for prompt in prompts:
            parts.append(f"<tr><td class=ans>{_e(prompt)}</td>"
                         + "".join(f"<td class=ans>{_e(col.get(prompt, '-'))}</td>" for _, col in cols) + "</tr>")
        parts.append("</table>")
    parts.append("<h2>Training curves</h2><p class=muted>Lines: training steps; points: held-out evaluations "
                 "(from each step's metrics.jsonl).</p>")
    for step in pipe.steps:
        png = dirs[step] / PLOT_FILE if step in dirs else None
        parts.append(f"<h3>Step {step}: {_e(e2e.step_name(step, pipe))}</h3>")
        if png is not None and png.is_file():
            data = base64.b64encode(png.read_bytes()).decode()
            parts.append(f"<img alt='step {step} training curves' src='data:image/png;base64,{data}'>")
        else:
            parts.append("<p class=muted>(no plot: the step did not run here, or logged no steps)</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out: Path, pipe: e2e.Pipeline, dirs: dict[int, Path], summary: dict[str, Any] | None = None) -> Path:
    """Write <out>/report.html; returns its path."""
    path = Path(out) / REPORT_FILE
    path.write_text(build_report(Path(out), pipe, dirs, summary))
    return path
