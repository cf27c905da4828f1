"""The `sigregions` commands, one module each with a ``main(argv, prog)``; `jobs/*.py` are shims that call them."""

from __future__ import annotations

from pipeline.config import SAMPLE_DATA, ConfigError


def sample_data_or(value: str, flag: str) -> str:
    """``value``, or the embedded sample data when it is empty and there is one.

    The sample (``data/caltech8``) ships with a source checkout, not with the wheel: an installed command without
    ``flag`` gets one clear line instead of a missing-folder error deep in the listing.

    Args:
        value: the flag's value ("" when not given).
        flag: the flag's name, for the error line.

    Returns:
        The value to use.

    Raises:
        ConfigError: no value given and no sample data here.
    """
    if value:
        return value
    if not SAMPLE_DATA.is_dir():
        raise ConfigError(f"pass {flag}: the embedded sample data ({SAMPLE_DATA.parent.name}/{SAMPLE_DATA.name}) "
                          "comes only with a source checkout, and there is none here")
    return str(SAMPLE_DATA)
