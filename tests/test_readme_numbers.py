"""Every measured figure the README quotes comes from a committed results file (issue 22).

A figure is a decimal number in the README's prose and tables (code blocks and `inline code`
are commands and settings, not results; version strings such as 5.0.0 are skipped). It is backed
when some number in a file under ``benchmarks/results/`` rounds to it at the README's precision.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

_DECIMAL = re.compile(r"(?<![\w.])(\d+\.\d+)(?![\w.]*\d)")


def readme_figures(text: str) -> list[tuple[int, str]]:
    """``(line number, figure)`` for every decimal number in prose and tables."""
    out = []
    in_code = False
    for no, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        prose = re.sub(r"`[^`]*`", "", line)
        out += [(no, m) for m in _DECIMAL.findall(prose)]
    return out


def result_numbers() -> set[float]:
    nums: set[float] = set()
    for f in RESULTS.rglob("*"):
        if f.is_file():
            text = f.read_text(errors="ignore")
            nums |= {float(m) for m in re.findall(r"\d+\.\d+(?:[eE]-?\d+)?", text)}
    return nums


def backed(figure: str, nums: set[float]) -> bool:
    digits = len(figure.split(".")[1])
    value = float(figure)
    return any(abs(round(x, digits) - value) < 0.5 * 10**-digits for x in nums)


def test_the_checker_finds_what_it_should():
    text = "ppl **19.37** (1.43x), v5.0.0, `lr=0.03`\n```\n0.99\n```\n| a | 2.5 |"
    assert [f for _, f in readme_figures(text)] == ["19.37", "1.43", "2.5"]
    assert backed("19.37", {19.36923}) and not backed("19.38", {19.36923})
    assert backed("0.42", {0.4231}) and not backed("0.42", {0.4261})


def test_every_readme_figure_is_in_a_results_file():
    nums = result_numbers()
    missing = [
        f"README.md:{no}: {fig}"
        for no, fig in readme_figures((ROOT / "README.md").read_text())
        if not backed(fig, nums)
    ]
    assert not missing, "figures without a results file:\n" + "\n".join(missing)
