"""``comhe energy MODEL_OR_CHECKPOINT``: per-layer hyperspherical energy of a timm model or a ``comhe fit`` checkpoint.

For each layer that CoMHE would regularize, the table shows its neuron sets (``S x N`` neurons of dimension ``d``),
its full-space energy, and the energy of Gaussian random neurons of the same shape (i.e. uniformly random
directions; fixed seed) for reference: a ratio below 1 means the layer's neurons are spread more evenly than random
ones, above 1 that they are more clustered.
"""

import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from jsonargparse import ActionYesNo, ArgumentParser
from torch import Tensor, nn

from lightning_comhe.cli.errors import ModelError
from lightning_comhe.cli.model import TimmClassifier, create_timm_model
from lightning_comhe.config import EnergyConfig, SelectionConfig
from lightning_comhe.discovery import NeuronLayer, discover_layers
from lightning_comhe.functional.energy import hyperspherical_energy, parse_power
from lightning_comhe.metric import layer_energies

__all__ = ["EnergyRow", "build_parser", "energy_main", "energy_table", "load_model", "random_reference"]


def build_parser(prog: str = "comhe energy") -> ArgumentParser:
    """Print the per-layer hyperspherical energy of a timm model or a `comhe fit` checkpoint."""
    parser = ArgumentParser(
        prog=prog,
        description=(
            "Print the full-space hyperspherical energy of each layer CoMHE would regularize, next to the energy of "
            "random neurons of the same shape, for a timm model name (random weights unless --pretrained) or a "
            "checkpoint written by `comhe fit`."
        ),
        exit_on_error=False,
        default_env=False,
    )
    parser.add_argument("model", type=str, help="A timm model name (see timm.list_models()) or a .ckpt file.")
    parser.add_argument("--plot", type=Optional[str], default=None, help="Write a PNG bar chart to this file.")
    parser.add_argument(
        "--num_classes", "--num-classes", type=Optional[int], default=None, help="Classifier outputs (default: timm's)."
    )
    parser.add_argument("--pretrained", action=ActionYesNo, default=False, help="Load timm's pretrained weights.")
    parser.add_argument("--in_chans", "--in-chans", type=int, default=3, help="Input channels of the timm model.")
    parser.add_argument("--img_size", "--img-size", type=Optional[int], default=None, help="Input size (ViT etc.).")
    parser.add_argument(
        "--power", type=Union[int, float, str], default=2, help="0, s > 0, or '0' '1' '2' 'a0' 'a1' 'a2'."
    )
    parser.add_argument("--angular", action=ActionYesNo, default=False, help="Angular instead of chordal distance.")
    parser.add_argument("--half_space", "--half-space", action=ActionYesNo, default=False, help="Half-space MHE.")
    parser.add_argument("--include", type=Optional[list[str]], default=None, help="Regexes of layer names to keep.")
    parser.add_argument("--exclude", type=Optional[list[str]], default=None, help="Regexes of layer names to drop.")
    parser.add_argument("--head", type=Optional[str], default="auto", help="Classifier module name, auto or null.")
    parser.add_argument(
        "--grouped", type=Literal["per_group", "skip"], default="per_group", help="Grouped convs: per_group or skip."
    )
    parser.add_argument(
        "--std_conv",
        "--std-conv",
        type=Literal["raw", "standardized"],
        default="raw",
        help="timm standardized convs: the raw or the standardized weight.",
    )
    parser.add_argument("--eps", type=float, default=1e-4, help="The constant inside each norm's square root.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights and reference neurons.")
    parser.add_argument("--device", type=str, default="cpu", help="Device to compute on (e.g. cuda).")
    return parser


def load_model(
    model: str,
    num_classes: int | None = None,
    pretrained: bool = False,
    in_chans: int = 3,
    img_size: int | None = None,
    seed: int = 0,
) -> tuple[nn.Module, str]:
    """A timm model (random weights drawn after ``torch.manual_seed(seed)``) or the timm model of a checkpoint.

    Returns:
        ``(model, description)``.

    Raises:
        ModelError: For an unknown name, a missing or unreadable checkpoint.
    """
    path = Path(model).expanduser()
    if path.is_file() or model.endswith(".ckpt"):
        if not path.is_file():
            raise ModelError(f"checkpoint not found: {path}")
        try:
            module = TimmClassifier.load_from_checkpoint(str(path), map_location="cpu")
        except ModelError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure means "not a comhe checkpoint"
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelError(f"cannot load {path} as a `comhe fit` (TimmClassifier) checkpoint: {first}") from err
        name = module.hparams.get("model_name", "model")
        return module.model, f"{name} from {path}"
    torch.manual_seed(seed)
    net = create_timm_model(model, num_classes, pretrained, in_chans, img_size)
    return net, f"{model} ({'pretrained' if pretrained else f'random init, seed {seed}'})"


def random_reference(
    layer: NeuronLayer,
    power: Any = 2,
    *,
    half_space: bool = False,
    angular: bool = False,
    seed: int = 0,
    eps: float = 1e-4,
) -> Tensor:
    """Energy of Gaussian neurons with the shapes of ``layer``'s sets (mean over sets), seeded per layer."""
    generator = torch.Generator().manual_seed(seed)
    values = []
    for s, n, d in layer.shapes():
        neurons = torch.randn(s, n, d, generator=generator)
        values.append(hyperspherical_energy(neurons, power, half_space=half_space, angular=angular, eps=eps))
    return torch.cat(values).mean()


class EnergyRow(dict):
    """One row of :func:`energy_table`: ``name``, ``role``, ``sets``, ``N``, ``d``, ``energy``, ``random``."""


def energy_table(
    model: nn.Module,
    power: Any = 2,
    *,
    half_space: bool = False,
    angular: bool = False,
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    head: str | list[str] | None = "auto",
    grouped: Literal["per_group", "skip"] = "per_group",
    std_conv: Literal["raw", "standardized"] = "raw",
    eps: float = 1e-4,
    seed: int = 0,
    selection: SelectionConfig | None = None,
) -> list[EnergyRow]:
    """Per-layer energy and random reference of ``model`` (the rows ``comhe energy`` prints).

    The layers are chosen by ``selection`` (a :class:`~lightning_comhe.config.SelectionConfig`), or by the same
    five keyword arguments (``include``, ``exclude``, ``head``, ``grouped``, ``std_conv``) as the callback.
    """
    if selection is None:
        selection = SelectionConfig(include=include, exclude=exclude, head=head, grouped=grouped, std_conv=std_conv)
    energy = EnergyConfig(variant="half_mhe" if half_space else "mhe", power=power, angular=angular, eps=eps)
    s, angular = energy.s, energy.is_angular
    layers = discover_layers(model, **selection.discovery_kwargs())
    energies = layer_energies(layers, s, half_space=half_space, angular=angular, eps=eps)
    rows = []
    for layer in layers.layers:
        shapes = layer.shapes()
        ref = random_reference(layer, s, half_space=half_space, angular=angular, seed=seed, eps=eps)
        rows.append(
            EnergyRow(
                name=layer.name,
                role=layer.role,
                sets=sum(k for k, _, _ in shapes),
                N=shapes[0][1],
                d=shapes[0][2],
                energy=float(energies[layer.name]),
                random=float(ref),
            )
        )
    return rows


def _format(rows: list[EnergyRow], title: str) -> str:
    width = max([len("layer"), len("total"), *(len(r["name"] or "<root>") for r in rows)])
    header = (
        f"{'layer':<{width}}  {'role':<6} {'sets':>5} {'N':>6} {'d':>7}  {'energy':>11} {'random':>11} {'ratio':>7}"
    )
    lines = [title, header, "-" * len(header)]
    for r in rows:
        ratio = r["energy"] / r["random"] if r["random"] else float("nan")
        lines.append(
            f"{r['name'] or '<root>':<{width}}  {r['role']:<6} {r['sets']:>5} {r['N']:>6} {r['d']:>7}  "
            f"{r['energy']:>11.5g} {r['random']:>11.5g} {ratio:>7.4f}"
        )
    total, total_ref = sum(r["energy"] for r in rows), sum(r["random"] for r in rows)
    ratio = total / total_ref if total_ref else float("nan")
    lines.append(
        f"{'total':<{width}}  {'':<6} {'':>5} {'':>6} {'':>7}  {total:>11.5g} {total_ref:>11.5g} {ratio:>7.4f}"
    )
    return "\n".join(lines)


def _plot(rows: list[EnergyRow], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    x = list(range(len(rows)))
    names = [r["name"] or "<root>" for r in rows]
    energy = [r["energy"] for r in rows]
    rand = [r["random"] for r in rows]
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(max(6.0, 0.32 * len(rows) + 2), 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    top.bar([i - 0.2 for i in x], energy, width=0.4, label="model")
    top.bar([i + 0.2 for i in x], rand, width=0.4, label="random neurons", alpha=0.7)
    values = [v for v in energy + rand if math.isfinite(v)]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        top.set_yscale("log")
    elif values:
        low, high = min(values), max(values)
        pad = 0.1 * (high - low) or 0.01 * abs(high) or 1.0
        top.set_ylim(low - pad, high + pad)
    top.set_ylabel("hyperspherical energy")
    top.set_title(title, fontsize=9)
    top.legend()
    ratio = [e / r if r else float("nan") for e, r in zip(energy, rand, strict=True)]
    bottom.bar(x, [v - 1 for v in ratio], bottom=1, color=["tab:green" if v <= 1 else "tab:red" for v in ratio])
    bottom.axhline(1, color="grey", linewidth=0.8)
    bottom.set_ylabel("model / random")
    bottom.set_xticks(x)
    bottom.set_xticklabels(names, rotation=75, ha="right", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def energy_main(args: list[str]) -> int:
    """Run ``comhe energy`` with ``args`` (after the subcommand name); print the table; return the exit status."""
    parser = build_parser()
    cfg = parser.parse_args(args)
    try:
        s, angular = parse_power(cfg.power, cfg.angular)
    except ValueError as err:
        raise ModelError(f"--power: {err}") from err
    model, description = load_model(cfg.model, cfg.num_classes, cfg.pretrained, cfg.in_chans, cfg.img_size, cfg.seed)
    model = model.to(cfg.device).eval()
    try:
        rows = energy_table(
            model,
            s,
            half_space=cfg.half_space,
            angular=angular,
            include=cfg.include,
            exclude=cfg.exclude,
            head=cfg.head,
            grouped=cfg.grouped,
            std_conv=cfg.std_conv,
            eps=cfg.eps,
            seed=cfg.seed,
        )
    except ValueError as err:
        raise ModelError(str(err)) from err
    kind = ("half-space" if cfg.half_space else "full-space") + (" angular" if angular else "")
    title = f"{description}: {kind} hyperspherical energy (power {s:g}) of {len(rows)} layers"
    print(_format(rows, title))
    if cfg.plot:
        path = Path(cfg.plot).expanduser()
        _plot(rows, title, path)
        print(f"plot: {path}")
    return 0
