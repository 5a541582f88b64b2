"""Full-space and half-space MHE (Liu et al., NeurIPS 2018): the families without projections."""

from lightning_comhe.energies.base import EnergyFamily

__all__ = ["FullSpaceMHE", "HalfSpaceMHE"]


class FullSpaceMHE(EnergyFamily):
    r"""``"mhe"``: full-space MHE :math:`E(W)` on every selected set."""

    name = "mhe"

    def hidden_mode(self, n: int, d: int) -> str:
        """Every hidden set: ``"plain"``."""
        return "plain"


class HalfSpaceMHE(EnergyFamily):
    r"""``"half_mhe"``: half-space MHE :math:`E([W; -W])` on hidden sets, full-space MHE on the classifier."""

    name = "half_mhe"

    def hidden_mode(self, n: int, d: int) -> str:
        """Every hidden set: ``"half"``."""
        return "half"
