"""A search space from Hydra's override grammar, as Hydra's Optuna sweeper reads it:

- ``choice(a, b, ...)`` and ``shuffle(range(...))``: categorical (a list value, ``[32,32]``, is one choice);
- ``range(start, stop[, step])``: integers (or a float grid with a float argument), ``stop`` included;
- ``interval(low, high)``: uniform floats (integers inside ``int(...)``), ``tag(log, ...)``: log-uniform;
- anything else is a fixed override, passed to every trial as typed.
"""

from typing import Any

from hydra.core.override_parser.types import Glob, Override, Transformer
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    DiscreteUniformDistribution,
    IntLogUniformDistribution,
    IntUniformDistribution,
    LogUniformDistribution,
    UniformDistribution,
)


def split(overrides: list[Override]) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
    """(the searched parameters, the fixed overrides by key); a later override of a key replaces an earlier one."""
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in overrides:
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed[key] = override.input_line
    return space, fixed


def distribution(override: Override) -> BaseDistribution:
    value = override.value()
    if isinstance(value, Glob):
        raise ValueError(f"{override.input_line}: the Optuna sweeper searches choice(), range() and interval(), "
                         "not glob(); list the values with choice(...)")
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
            return DiscreteUniformDistribution(value.start, value.stop, value.step)
        return IntUniformDistribution(int(value.start), int(value.stop), step=int(value.step))
    if override.is_interval_sweep():
        integers = isinstance(value.start, int) and isinstance(value.end, int)
        if "log" in value.tags:
            return IntLogUniformDistribution(value.start, value.end) if integers else \
                LogUniformDistribution(value.start, value.end)
        return IntUniformDistribution(value.start, value.end) if integers else UniformDistribution(value.start,
                                                                                                   value.end)
    raise ValueError(f"{override.input_line}: not a search space of the Optuna sweeper")


def grid(space: dict[str, BaseDistribution]) -> dict[str, list[Any]]:
    """The values of each parameter for Optuna's GridSampler (``hydra/sweeper/sampler=grid``): discrete ones only."""
    values = {}
    for key, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            values[key] = list(dist.choices)
        elif isinstance(dist, IntUniformDistribution):
            values[key] = list(range(dist.low, dist.high + 1, dist.step))
        elif isinstance(dist, DiscreteUniformDistribution):
            count = int(round((dist.high - dist.low) / dist.q)) + 1
            values[key] = [dist.low + i * dist.q for i in range(count)]
        else:
            raise ValueError(f"{key}: hydra/sweeper/sampler=grid needs discrete values (choice or range), "
                             f"not {type(dist).__name__}")
    return values
