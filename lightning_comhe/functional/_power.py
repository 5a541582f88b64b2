"""Power specifications of the energies: official ``power_s`` strings and numeric exponents, as ``(s, angular)``.

A leaf module (standard library only). The public names are re-exported by :mod:`lightning_comhe.functional.energy`
and :mod:`lightning_comhe.functional`.
"""

import math

__all__ = ["OFFICIAL_POWERS", "PowerLike", "parse_power"]

PowerLike = float | int | str

#: The official ``power_s`` strings of wy1iu/MHE and rmlin/CoMHE mapped to ``(s, angular)``.
OFFICIAL_POWERS: dict[str, tuple[float, bool]] = {
    "0": (0.0, False),
    "1": (1.0, False),
    "2": (2.0, False),
    "a0": (0.0, True),
    "a1": (1.0, True),
    "a2": (2.0, True),
}


def parse_power(power: PowerLike, angular: bool = False) -> tuple[float, bool]:
    """Parse a power specification into ``(s, angular)``.

    Args:
        power: ``0`` (logarithmic energy), any finite float ``> 0`` (Riesz ``s``-energy), or one of the official
            strings ``"0"``, ``"1"``, ``"2"``, ``"a0"``, ``"a1"``, ``"a2"`` (the ``a`` forms are angular).
        angular: Use the angular distance. An ``"a"`` string forces it.

    Returns:
        The exponent ``s >= 0`` and whether the angular distance is used.

    Raises:
        ValueError: If ``power`` is not one of the allowed values.

    Example::

        >>> parse_power("a2")
        (2.0, True)
        >>> parse_power(1.5)
        (1.5, False)
    """
    allowed = "0, a float > 0, or one of the official strings '0', '1', '2', 'a0', 'a1', 'a2'"
    if isinstance(power, bool):
        raise ValueError(f"`power` must be {allowed}, got {power!r}.")
    if isinstance(power, str):
        key = power.strip().lower()
        if key in OFFICIAL_POWERS:
            s, ang = OFFICIAL_POWERS[key]
            return s, ang or bool(angular)
        try:
            value = float(key)
        except ValueError:
            raise ValueError(f"`power` must be {allowed}, got {power!r}.") from None
    elif isinstance(power, (int, float)):
        value = float(power)
    else:
        raise ValueError(f"`power` must be {allowed}, got {power!r} of type {type(power).__name__}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`power` must be {allowed}, got {power!r}.")
    return value, bool(angular)
