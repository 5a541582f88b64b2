"""Device helpers shared by the functional core: nothing here is specific to one accelerator."""

import contextlib

import torch

__all__ = ["autocast_off"]


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that disables autocast on ``device``'s type, or does nothing where that type has no autocast.

    The energies compute in the neurons' own dtype (float32 master weights under mixed precision); device types
    without an autocast (e.g. ``meta``) cannot be running one, so no context is needed there.

    Example::

        >>> with autocast_off(torch.device("meta")):
        ...     pass
    """
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()
