"""Where in the sampling an effect acts: a node's start/end percents as the model's sigmas."""

from __future__ import annotations

from ...models.errors import IDFuseInputError


def sigma_range(model, start_percent: float, end_percent: float, start_input: str = "start_percent",
                end_input: str = "end_percent") -> tuple[float, float]:
    """(sigma at start_percent, sigma at end_percent) of ``model``'s sampling; the first is the larger,
    as sigmas fall during sampling. ``start_input``/``end_input`` are the node inputs named in the error."""
    if start_percent > end_percent:
        raise IDFuseInputError(f"{start_input} ({start_percent}) is after {end_input} ({end_percent}); set "
                               f"{start_input} to at most {end_input}.")
    sampling = model.get_model_object("model_sampling")
    return float(sampling.percent_to_sigma(start_percent)), float(sampling.percent_to_sigma(end_percent))
