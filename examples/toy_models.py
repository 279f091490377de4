"""The paper's toy models of erasure and self-repair (Section 3.3): effects of ablating x.

Prints a table of the total, direct and indirect effects of do(x = 0) on y, and the
compensation TE - DE, for a few contexts u; saves a figure (y under each intervention value,
and the two graphs with the intervention marked) to the path given on the command line.

    python examples/toy_models.py [out.png]      # default: toy_models.png in the cwd
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from matplotlib.figure import Figure

from causalnet import SCM, direct_effect, draw, indirect_effect, total_effect
from causalnet.toys import erasure, self_repair


def effects_table(models: dict[str, SCM], u: torch.Tensor) -> str:
    """One row per model and context: u, TE, DE, IE, TE - DE under do(x = 0)."""
    rows = [f"{'model':<12}{'u':>7}{'TE':>7}{'DE':>7}{'IE':>7}{'TE-DE':>7}"]
    for name, scm in models.items():
        ctx = {"u": u}
        te = total_effect(scm, "x", "y", ctx, 0.0)
        de = direct_effect(scm, "x", "y", ctx, 0.0)
        ie = indirect_effect(scm, "x", "y", ctx, 0.0)
        for k in range(len(u)):
            cells = (u[k], te[k], de[k], ie[k], te[k] - de[k])
            rows.append(f"{name:<12}" + "".join(f"{float(c):>7.2f}" for c in cells))
    return "\n".join(rows)


def figure(models: dict[str, SCM]) -> Figure:
    """y against the intervention value x' for u = 1, and each graph under do(x = 0)."""
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    axes = fig.subplots(1, 1 + len(models), width_ratios=[1.2] + [1] * len(models))
    u = torch.ones(1)
    xs = torch.linspace(-2, 2, 81)
    for name, scm in models.items():
        ys = [scm.run({"u": u}, do={"x": float(x)})["y"].item() for x in xs]
        axes[0].plot(xs, ys, label=name, marker="." if name == "self_repair" else None)
    axes[0].axvline(0.0, color="0.6", linestyle=":")
    axes[0].set(
        xlabel="intervention value x'",
        ylabel="y(u=1 | do(x=x'))",
        title="y under do(x = x'), natural x = u = 1",
    )
    axes[0].legend()
    for ax, (name, scm) in zip(axes[1:], models.items(), strict=True):
        draw(scm, do={"x": 0.0}, ax=ax)
        ax.set_title(f"{name}: do(x = 0)")
    return fig


def main(argv: list[str]) -> None:
    out = Path(argv[0]) if argv else Path("toy_models.png")
    models = {"erasure": erasure(), "self_repair": self_repair()}
    print(effects_table(models, torch.tensor([-2.0, 0.5, 3.0])))
    figure(models).savefig(out, dpi=100)
    print(f"saved {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
