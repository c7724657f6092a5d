"""Train loss curves of several runs overlaid, as an SVG and (with Pillow) a PNG: the benchmark's
loss against wall time, the bake-off's loss against step. Each result's "curve" is [(x, loss), ...]."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _plot_items(results: dict[str, dict[str, Any]], title: str, x_label: str) -> tuple[int, int, list[tuple]]:
    """Train loss against wall time for every run, as drawing items shared by the SVG and the PNG:
    ("line", x1, y1, x2, y2, color, width), ("poly", points, color), ("text", x, y, text, anchor)."""
    curves = {k: v["curve"] for k, v in results.items() if v.get("curve")}
    width, height, left, right, top, bottom = 760, 450, 64, 170, 48, 48
    t_max = max((c[-1][0] for c in curves.values()), default=1.0) or 1.0
    losses = [p[1] for c in curves.values() for p in c if math.isfinite(p[1])]
    y_max, y_min = max(losses, default=1.0), min(0.0, min(losses, default=0.0))
    w, h = width - left - right, height - top - bottom

    def xy(t: float, y: float) -> tuple[float, float]:
        return left + w * t / t_max, top + h * (1 - (y - y_min) / ((y_max - y_min) or 1.0))

    items: list[tuple] = [
        ("text", width / 2, 20, title, "middle"),
        ("line", left, top + h, left + w, top + h, "#000000", 1),
        ("line", left, top, left, top + h, "#000000", 1),
        ("text", left + w / 2, height - 10, x_label, "middle"),
        ("text", 8, top - 14, "train loss", "start"),
    ]
    for i in range(6):
        x, _ = xy(t_max * i / 5, y_min)
        items += [("line", x, top + h, x, top + h + 4, "#000000", 1), ("text", x, top + h + 18, f"{t_max * i / 5:.{0 if t_max >= 20 else 1}f}", "middle")]
        y_val = y_min + (y_max - y_min) * i / 5
        _, y = xy(0, y_val)
        items += [("line", left - 4, y, left, y, "#000000", 1), ("line", left, y, left + w, y, "#e0e0e0", 1),
                  ("text", left - 7, y + 4, f"{y_val:.1f}", "end")]
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    for i, (name, curve) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        items.append(("poly", [xy(t, v) for t, v in curve if math.isfinite(v)], color))
        ly = top + 14 + 20 * i
        items += [("line", left + w + 12, ly - 4, left + w + 34, ly - 4, color, 3), ("text", left + w + 40, ly, name, "start")]
    return width, height, items


WALL_TIME = "wall time of the training loop (s)"


def loss_svg(results: dict[str, dict[str, Any]], title: str, x_label: str = WALL_TIME) -> str:
    width, height, items = _plot_items(results, title, x_label)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12"><rect width="{width}" height="{height}" fill="white"/>']
    for item in items:
        if item[0] == "line":
            _, x1, y1, x2, y2, color, lw = item
            out.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{color}" stroke-width="{lw}"/>')
        elif item[0] == "poly":
            points = " ".join(f"{x:.1f},{y:.1f}" for x, y in item[1])
            out.append(f'<polyline fill="none" stroke="{item[2]}" stroke-width="2" points="{points}"/>')
        else:
            _, x, y, text, anchor = item
            out.append(f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}">{_escape(text)}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


def loss_png(results: dict[str, dict[str, Any]], title: str, path: Path, x_label: str = WALL_TIME) -> bool:
    """The same plot as a PNG, with Pillow (installed with gradio); False when Pillow is missing."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        return False
    width, height, items = _plot_items(results, title, x_label)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        font = ImageFont.load_default()
    for item in items:
        if item[0] == "line":
            _, x1, y1, x2, y2, color, lw = item
            draw.line([(x1, y1), (x2, y2)], fill=color, width=lw)
        elif item[0] == "poly":
            if len(item[1]) > 1:
                draw.line(item[1], fill=item[2], width=2, joint="curve")
        else:
            _, x, y, text, anchor = item
            draw.text((x, y), text, fill="black", font=font, anchor={"start": "ls", "middle": "ms", "end": "rs"}[anchor])
    tmp = path.with_name("." + path.name + ".tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return True


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

