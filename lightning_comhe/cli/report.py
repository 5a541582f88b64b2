"""``ComheReport``: the energy / accuracy history of a fit, a summary table, and a PNG plot of the run."""

import json
import math
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_comhe.callback import CoMHE
from lightning_comhe.discovery import NeuronLayer, discover_layers
from lightning_comhe.metric import layer_energies

__all__ = ["ComheReport"]


def _scalar(value: Any) -> float | None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            return None
        value = value.detach().float().cpu().item()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}"


class ComheReport(Callback):
    """Track the full-space hyperspherical energy of the regularized layers and the accuracy during ``fit``.

    The layers are those of the :class:`~lightning_comhe.CoMHE` callback of the trainer (the first one without a
    ``name`` if there are several; all layers found by
    :func:`~lightning_comhe.discovery.discover_layers` when there is none, e.g. for a baseline run), measured with
    :func:`~lightning_comhe.metric.layer_energies` in full space (no projection, no half-space), with the power of
    the CoMHE callback. Measurements: at fit start (epoch 0), after every ``every_n_epochs`` training epochs
    (together with ``val/acc``, ``val/loss``, ``train/loss`` and ``comhe/penalty`` from the logged metrics), and at
    fit end. ``test/acc`` and ``test/loss`` are recorded by a following ``trainer.test``.

    At fit end, the process of global rank 0 writes ``<filename>.png`` (energy and accuracy over the epochs) and
    ``<filename>.json`` (every number) into ``dirpath``, by default the run folder (``trainer.log_dir``, e.g.
    ``lightning_logs/version_0``, else ``default_root_dir``). :meth:`render` returns the summary table.

    Args:
        plot: Write the PNG plot (matplotlib, Agg backend).
        filename: Base name of the written files (``.png`` and ``.json`` are appended).
        dirpath: Folder of the written files. ``None``: the run folder.
        every_n_epochs: Measure the energy every this many training epochs.
        power: Energy power for the measurements. ``None``: the CoMHE callback's (2 without one).

    Example::

        >>> from lightning_comhe import CoMHE  # doctest: +SKIP
        >>> report = ComheReport()  # doctest: +SKIP
        >>> trainer = Trainer(callbacks=[CoMHE(), report]); trainer.fit(model); trainer.test(model)  # doctest: +SKIP
        >>> print(report.render())  # doctest: +SKIP
    """

    def __init__(
        self,
        plot: bool = True,
        filename: str = "comhe_report",
        dirpath: str | None = None,
        every_n_epochs: int = 1,
        power: float | str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"`every_n_epochs` must be an int >= 1, got {every_n_epochs!r}.")
        if not filename or os.sep in filename:
            raise ValueError(f"`filename` must be a file name without folder, got {filename!r}.")
        self.plot = plot
        self.filename = filename
        self.dirpath = dirpath
        self.every_n_epochs = every_n_epochs
        self.power = power
        self._reset()

    def _reset(self) -> None:
        self.layers: list[NeuronLayer] = []
        self.variant: str | None = None
        self.energy_kwargs: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.start: dict[str, float] = {}
        self.end: dict[str, float] = {}
        self.test: dict[str, float] = {}
        self.run_dir: Path | None = None
        self.plot_path: Path | None = None
        self.json_path: Path | None = None
        self.description = ""

    # ------------------------------------------------------------------------------------------------------------
    def _resolve_layers(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        instances = [cb for cb in trainer.callbacks if isinstance(cb, CoMHE)]
        comhe = next((cb for cb in instances if cb.name is None), instances[0] if instances else None)
        power: Any = 2
        angular, eps = False, 1e-4
        if comhe is not None:
            self.variant = comhe.variant
            reg = comhe.regularizer
            if reg is not None:
                self.layers = list(reg.selection.layers)
                power, angular, eps = reg.s, reg.angular, reg.eps
            else:  # built lazily (lazy parameters): measure what discovery finds with the same filters
                power, angular = comhe.power, comhe.angular
                self.layers = discover_layers(
                    pl_module,
                    include=comhe.include,
                    exclude=comhe.exclude,
                    head=comhe.head,
                    grouped=comhe.grouped,
                    std_conv=comhe.std_conv,
                ).layers
        else:
            self.layers = discover_layers(pl_module).layers
        if self.power is not None:
            power, angular = self.power, False
        self.energy_kwargs = {"power": power, "angular": angular, "eps": eps}

    def _measure(self) -> dict[str, float]:
        if not self.layers:
            return {}
        values = layer_energies(self.layers, **self.energy_kwargs)
        return {name: float(v) for name, v in values.items()}

    @staticmethod
    def _metrics(trainer: "pl.Trainer", *keys: str) -> dict[str, float | None]:
        metrics = trainer.callback_metrics
        out: dict[str, float | None] = {}
        for key in keys:
            value = None
            for candidate in (key, f"{key}_epoch"):
                if candidate in metrics:
                    value = _scalar(metrics[candidate])
                    break
            out[key] = value
        return out

    # ------------------------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Resolve the layers and the run folder; measure the starting energies."""
        self._reset()
        self._resolve_layers(trainer, pl_module)
        dirpath = self.dirpath if self.dirpath is not None else (trainer.log_dir or trainer.default_root_dir)
        self.run_dir = Path(dirpath)
        model_name = getattr(getattr(pl_module, "hparams", {}), "get", lambda *_: None)("model_name")
        model = f"{type(pl_module).__name__}({model_name})" if model_name else type(pl_module).__name__
        data = type(trainer.datamodule).__name__ if trainer.datamodule is not None else "dataloaders"
        regularizer = f"CoMHE variant {self.variant!r}" if self.variant else "no CoMHE"
        self.description = f"{model} on {data}, {regularizer}"
        self.start = self._measure()
        self.history.append({"epoch": 0, "step": trainer.global_step, "energies": dict(self.start)})

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Measure the energies and read the epoch's metrics."""
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs and epoch != trainer.max_epochs:
            return
        row: dict[str, Any] = {"epoch": epoch, "step": trainer.global_step, "energies": self._measure()}
        row.update(self._metrics(trainer, "val/acc", "val/loss", "train/loss", "train/acc", "comhe/penalty"))
        self.history.append(row)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Measure the final energies; write the plot and the JSON file (global rank 0)."""
        self.end = self._measure()
        if trainer.is_global_zero:
            self._write()

    def on_test_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Record ``test/acc`` and ``test/loss``."""
        self.test = {k: v for k, v in self._metrics(trainer, "test/acc", "test/loss").items() if v is not None}
        if trainer.is_global_zero and self.json_path is not None:
            self._write_json()
            if self.plot_path is not None:
                self._write_plot(self.plot_path)  # again, with the test accuracy

    # ------------------------------------------------------------------------------------------------------------
    @property
    def final_penalty(self) -> float | None:
        """The last logged ``comhe/penalty`` (``None`` without CoMHE)."""
        for row in reversed(self.history):
            if row.get("comhe/penalty") is not None:
                return row["comhe/penalty"]
        return None

    def _shapes(self) -> dict[str, tuple[int, int, int]]:
        out = {}
        for layer in self.layers:
            shapes = layer.shapes()
            out[layer.name] = (sum(s for s, _, _ in shapes), shapes[0][1], shapes[0][2])
        return out

    def _write(self) -> None:
        assert self.run_dir is not None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.json_path = self.run_dir / f"{self.filename}.json"
        self._write_json()
        if self.plot:
            self.plot_path = self.run_dir / f"{self.filename}.png"
            self._write_plot(self.plot_path)

    def _write_json(self) -> None:
        assert self.json_path is not None
        data = {
            "description": self.description,
            "variant": self.variant,
            "energy": {k: v for k, v in self.energy_kwargs.items() if k != "eps"},
            "layers": {name: {"sets": s, "N": n, "d": d} for name, (s, n, d) in self._shapes().items()},
            "start": self.start,
            "end": self.end,
            "test": self.test,
            "final_penalty": self.final_penalty,
            "history": self.history,
        }
        self.json_path.write_text(json.dumps(data, indent=2, default=str))

    def _write_plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        epochs = [row["epoch"] for row in self.history]
        names = [layer.name for layer in self.layers]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        total = [sum(row["energies"].values()) if row["energies"] else float("nan") for row in self.history]
        axes[0].plot(epochs, total, marker="o", color="tab:blue")
        axes[0].set_title("total full-space energy (regularized layers)")
        axes[0].set_xlabel("epoch")
        axes[0].set_ylabel("energy")
        for name in names:
            start = self.start.get(name)
            if not start:
                continue
            rel = [row["energies"].get(name, float("nan")) / start for row in self.history]
            axes[1].plot(epochs, rel, linewidth=1, alpha=0.8, label=name)
        axes[1].axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        axes[1].set_title("energy per layer / energy at start")
        axes[1].set_xlabel("epoch")
        if 0 < len(names) <= 16:
            axes[1].legend(fontsize=5, loc="best")
        acc_rows = [(row["epoch"], row.get("val/acc")) for row in self.history if row.get("val/acc") is not None]
        if acc_rows:
            axes[2].plot([e for e, _ in acc_rows], [a for _, a in acc_rows], marker="o", color="tab:green", label="val")
            if "test/acc" in self.test:
                axes[2].axhline(self.test["test/acc"], color="tab:red", linestyle="--", label="test")
            axes[2].legend(loc="lower right")
        else:
            axes[2].text(
                0.5, 0.5, "no validation accuracy logged", ha="center", va="center", transform=axes[2].transAxes
            )
        axes[2].set_title("accuracy")
        axes[2].set_xlabel("epoch")
        fig.suptitle(self.description)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    # ------------------------------------------------------------------------------------------------------------
    def render(self) -> str:
        """The summary table: test accuracy, final penalty, and each layer's energy at start and end."""
        shapes = self._shapes()
        names = [layer.name for layer in self.layers]
        roles = {layer.name: layer.role for layer in self.layers}
        width = max([len("layer"), len("total"), *(len(n) for n in names)])
        power = self.energy_kwargs.get("power", 2)
        power = f"{power:g}" if isinstance(power, (int, float)) else str(power)
        angular = " angular" if self.energy_kwargs.get("angular") else ""
        lines = [f"CoMHE report: {self.description}"]
        lines.append(f"  test accuracy  {_fmt(self.test.get('test/acc'))}")
        lines.append(f"  final penalty  {_fmt(self.final_penalty)}")
        lines.append(f"  full-space hyperspherical energy (power {power}{angular}) of {len(names)} layers:")
        header = f"  {'layer':<{width}}  {'role':<6} {'N':>5} {'d':>6}  {'start':>10} {'end':>10} {'change':>8}"
        lines.append(header)
        lines.append("  " + "-" * (len(header) - 2))

        def row(name: str, role: str, n: str, d: str, a: float | None, b: float | None) -> str:
            change = f"{100 * (b - a) / abs(a):+.1f}%" if a and b is not None else "n/a"
            return f"  {name:<{width}}  {role:<6} {n:>5} {d:>6}  {_fmt(a):>10} {_fmt(b):>10} {change:>8}"

        for name in names:
            s, n, d = shapes[name]
            n_text = f"{s}x{n}" if s > 1 else str(n)
            lines.append(row(name, roles[name], n_text, str(d), self.start.get(name), self.end.get(name)))
        if names:
            total_start = sum(self.start.values()) if self.start else None
            total_end = sum(self.end.values()) if self.end else None
            lines.append(row("total", "", "", "", total_start, total_end))
        if self.plot_path is not None:
            lines.append(f"  plot: {self.plot_path}")
        if self.json_path is not None:
            lines.append(f"  data: {self.json_path}")
        return "\n".join(lines)
